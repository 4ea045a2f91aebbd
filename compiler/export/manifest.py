"""An artifact's manifest: file names, versions, and the checks every load makes before reading anything.

Every path the manifest names is checked to stay inside the artifact directory (no absolute paths, no `..`,
no symlink leading out) before it is hashed or read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # detached ed25519 signature of manifest.json (optional; see signing.py)
FORWARD = "forward.py"
GRAPH = "graph.json"
WEIGHTS = "weights.safetensors"
KERNELS = "kernels"
MANIFEST_KEYS = ("versions", "options", "model", "submodules", "weights", "kernels", "report", "files")


class ArtifactError(ValueError):
    """An artifact that must not be loaded (changed, incomplete, incompatible versions) or cannot be saved."""


def is_artifact(path: object) -> bool:
    """Whether `path` is meant as a kiln artifact (rather than an HF checkpoint directory)."""
    if not isinstance(path, (str, Path)):
        return False
    root = Path(path)
    return (root / MANIFEST).is_file() or (root / FORWARD).is_file()


def versions() -> dict[str, str | None]:
    """The versions that decide whether an artifact's forward and weights still mean the same thing."""
    from kiln.version import __version__

    def installed(package: str) -> str | None:  # from package metadata: importing triton just to ask is slow
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "kiln": __version__,
        "torch": torch.__version__,
        "triton": installed("triton"),
        "transformers": installed("transformers"),
    }


def sha256(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest needs Python 3.11
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inside(root: Path, name: object) -> Path:
    """root/name, refused unless `name` is a relative path that stays in `root` once symlinks are resolved."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ArtifactError(f"{root}: the manifest names the path {name!r}, which is not a relative file name")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ArtifactError(f"{root}: the manifest path {name!r} leads outside the artifact")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{root}: the manifest path {name!r} leads outside the artifact (through a symlink)")
    return path


def read_manifest(root: Path) -> dict[str, Any]:
    if not (root / MANIFEST).is_file():
        raise ArtifactError(f"{root}: {MANIFEST} is missing; this is not a complete kiln artifact")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{root / MANIFEST}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{root}: version mismatch: artifact format {found!r}, this kiln reads format {FORMAT}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ArtifactError(f"{root}: {MANIFEST} lacks {', '.join(missing)}; recompile with `kiln compile -o`")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["kernels"], dict):
        raise ArtifactError(f"{root}: {MANIFEST}: files and kernels must be objects")
    for name in manifest["files"]:
        inside(root, name)
    for name in manifest["kernels"]:
        if f"{KERNELS}/{name}" not in manifest["files"]:
            inside(root / KERNELS, name)
            raise ArtifactError(f"{root}: kernel {name!r} is not among the files the manifest hashes")
    return manifest


def check_versions(root: Path, built: dict[str, Any]) -> None:
    """Refuse artifacts from another kiln or torch major.minor: op semantics and kernels may differ."""
    here = versions()
    for name in ("kiln", "torch"):
        theirs, ours = str(built.get(name)), str(here[name])
        if theirs.split(".")[:2] != ours.split(".")[:2]:
            raise ArtifactError(
                f"{root}: version mismatch: compiled with {name} {theirs}, running {name} {ours} "
                f"(major.minor must match); recompile the model with `kiln compile`"
            )


def verify(root: Path, files: dict[str, str]) -> None:
    """Every listed file present with its hash, and nothing else: the error names the offending file."""
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST, SIGNATURE}
    missing, extra = sorted(set(files) - present), sorted(present - set(files))
    if missing:
        raise ArtifactError(f"{root}: checksum mismatch: missing file(s) {', '.join(missing)}")
    if extra:
        raise ArtifactError(f"{root}: checksum mismatch: extra file(s) {', '.join(extra)} not listed in {MANIFEST}")
    changed = [name for name, digest in sorted(files.items()) if sha256(inside(root, name)) != digest]
    if changed:
        raise ArtifactError(f"{root}: checksum mismatch: {', '.join(changed)} changed since it was compiled")
