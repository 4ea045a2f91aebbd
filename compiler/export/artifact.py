"""Ahead-of-time artifacts: a compiled model saved as a directory that loads without tracing or passes.

Layout: `manifest.json` (versions, options, the pass report, the SHA-256 of every other file), `forward.py`
(the final FX graph as plain Python), `weights.safetensors` (exactly the tensors that forward reads, after
fusion/quantization), `kernels/` (whatever the backend generated), and the HF config, generation config and
tokenizer files. Nothing is pickled, so loading an artifact never runs code other than `forward.py`, which
is checked against its hash first.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.fx as fx

import kiln.ops  # noqa: F401  (declares the kiln:: ops the forward calls)
from kiln.compiler.compiled import CompiledModel, KVLayout
from kiln.passes.base import PassReport

from .forward_source import SourceError, forward_source, graph_modules

FORMAT = 1
MANIFEST = "manifest.json"
FORWARD = "forward.py"
WEIGHTS = "weights.safetensors"
KERNELS = "kernels"
# A backend that generates kernels attaches {relative name: source text or binary bytes} under this name.
KERNELS_ATTR = "kernels"
_MANIFEST_KEYS = ("versions", "options", "model", "submodules", "weights", "kernels", "report", "files")

Progress = Callable[[str], None]


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


# Saving ------------------------------------------------------------------------------------------------


def _weights(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Every tensor the graphs read by attribute path; tied tensors are stored once, aliased by name."""
    read = {
        f"{path}.{n.target}" if path else str(n.target)
        for path, module in graph_modules(gm).items()
        for n in module.graph.nodes
        if n.op == "get_attr"
    }
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name in sorted(read):
        value = _get(gm, name)
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"the forward reads {name}, which is a {type(value).__name__}, not a tensor")
        value = value.detach()
        ptr = value.untyped_storage().data_ptr()
        key = (ptr, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = value.contiguous() if ptr not in storages else value.clone()  # safetensors: no overlaps
        storages.add(ptr)
    return tensors, sorted(read & params), aliases


def _get(root: torch.nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def sha256(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest needs Python 3.11
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(
    compiled: CompiledModel,
    path: str | Path,
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    target: str | None = None,
) -> Path:
    """Write `compiled` as an artifact directory at `path` (which must not exist or be empty).

    target (e.g. "cuda:90"): also cross-compile every generated kernel for it (sources, cubins, records) into
    kernels/, with no GPU needed. `options` are recorded in the manifest as given.
    """
    say = progress or (lambda _msg: None)
    gm = compiled.graph_module
    if not isinstance(gm, fx.GraphModule):
        raise ArtifactError("this model was loaded from an artifact already; copy that directory instead")
    root = Path(path)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root}: exists and is not an empty directory; refusing to overwrite")
    root.mkdir(parents=True, exist_ok=True)
    try:
        count = _write(compiled, gm, root, options or {}, say, target)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)  # it was empty or absent: leave no half-written artifact
        raise
    say(f"saved {root} ({count} files)")
    return root


def _write(
    compiled: CompiledModel, gm: fx.GraphModule, root: Path, options: dict[str, Any], say: Progress, target: str | None
) -> int:
    """Write every file, the manifest last; returns how many files the manifest lists."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    say(f"writing {FORWARD}")
    try:
        source, submodules = forward_source(gm)
    except SourceError as err:
        raise ArtifactError(str(err)) from err
    (root / FORWARD).write_text(source)
    say(f"writing {WEIGHTS}")
    tensors, params, aliases = _weights(gm)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(root / WEIGHTS), metadata={"format": "pt"})
    kernels = dict(getattr(compiled, KERNELS_ATTR, None) or {})
    for name, content in kernels.items():
        file = root / KERNELS / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(content) if isinstance(content, bytes) else file.write_text(content)
    if target is not None:
        say(f"cross-compiling kernels for {target}")
        _cross_compile(compiled, target, root / KERNELS)
    say("writing config, generation config and tokenizer")
    compiled.hf_config.save_pretrained(root)
    generation = getattr(compiled, "generation_config", None) or GenerationConfig.from_model_config(compiled.hf_config)
    generation.save_pretrained(root)
    if compiled.tokenizer is not None:
        compiled.tokenizer.save_pretrained(root)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "versions": versions(),
        "options": {
            "backend": compiled.backend,
            "dtype": str(compiled.dtype).removeprefix("torch."),
            "max_model_len": compiled.max_model_len,
            **({"target": target} if target else {}),
            **options,
        },
        "model": {
            "kv_layouts": [vars(layout) for layout in compiled.kv_layouts],
            "eos_token_ids": compiled.eos_token_ids,
            "kv_cache_dtype": compiled.kv_cache_dtype,
        },
        "submodules": submodules,
        "weights": {"parameters": params, "aliases": aliases},
        "kernels": {name: "binary" if isinstance(c, bytes) else "text" for name, c in kernels.items()},
        "report": compiled.report.to_dict(),
        "files": {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return len(manifest["files"])


def can_cross_compile() -> bool:
    """Whether this kiln build has the codegen cross-compiler that `save(..., target=...)` needs."""
    return importlib.util.find_spec("kiln.codegen.cross_compile") is not None


def _cross_compile(compiled: CompiledModel, target: str, out_dir: Path) -> None:
    if not can_cross_compile():
        raise ArtifactError(
            f"target {target!r}: this kiln build cannot cross-compile kernels (no kiln.codegen.cross_compile)"
        )
    from kiln.codegen.cross_compile import cross_compile

    cross_compile(compiled, target=target, out_dir=out_dir)


# Loading -----------------------------------------------------------------------------------------------


def _read_manifest(root: Path) -> dict[str, Any]:
    if not (root / MANIFEST).is_file():
        raise ArtifactError(f"{root}: {MANIFEST} is missing; this is not a complete kiln artifact")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{root / MANIFEST}: not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"{root}: version mismatch: artifact format {manifest.get('format')!r}, this kiln reads format {FORMAT}"
        )
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ArtifactError(f"{root}: {MANIFEST} lacks {', '.join(missing)}; recompile with `kiln compile -o`")
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
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    missing, extra = sorted(set(files) - present), sorted(present - set(files))
    if missing:
        raise ArtifactError(f"{root}: checksum mismatch: missing file(s) {', '.join(missing)}")
    if extra:
        raise ArtifactError(f"{root}: checksum mismatch: extra file(s) {', '.join(extra)} not listed in {MANIFEST}")
    changed = [name for name, digest in sorted(files.items()) if sha256(root / name) != digest]
    if changed:
        raise ArtifactError(f"{root}: checksum mismatch: {', '.join(changed)} changed since it was compiled")


def _import_forward(root: Path) -> types.ModuleType:
    """Import forward.py by file location; bytecode caching is skipped so the directory stays as hashed."""
    path = root / FORWARD
    name = f"kiln_artifact_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ArtifactError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    source = path.read_text()
    exec(compile(source, str(path), "exec"), module.__dict__)
    module.SOURCE = source  # type: ignore[attr-defined]
    return module


def _child(owner: torch.nn.Module, path: list[str]) -> torch.nn.Module:
    """The module at `path` under `owner`, creating plain modules for missing levels."""
    for part in path:
        if part not in owner._modules:
            owner.add_module(part, torch.nn.Module())
        owner = cast(torch.nn.Module, owner._modules[part])
    return owner


def _module_tree(
    forward: types.ModuleType, submodules: dict[str, str], tensors: dict[str, torch.Tensor], params: set[str]
) -> torch.nn.Module:
    """Modules running forward.py's functions, with the tensors at the dotted paths the source reads."""
    root = type("KilnForward", (torch.nn.Module,), {"forward": forward.forward, "code": forward.SOURCE})()
    for path, function in sorted(submodules.items(), key=lambda item: item[0].count(".")):
        *parents, leaf = path.split(".")
        module = type(leaf, (torch.nn.Module,), {"forward": getattr(forward, function)})()
        _child(root, parents).add_module(leaf, module)
    for name, tensor in tensors.items():
        *parents, leaf = name.split(".")
        owner = _child(root, parents)
        if name in params:
            owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            owner.register_buffer(leaf, tensor)
    return root.eval()


def load(
    path: str | Path,
    *,
    backend: str = "auto",
    dtype: str | torch.dtype | None = None,
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    device: str | torch.device | None = "auto",
    **options: bool,
) -> CompiledModel:
    """Start serving from an artifact: verify it, read the weights, import the forward. No tracing, no passes.

    An artifact records no device: its weights load straight onto `device` ("auto": the first CUDA GPU when
    there is one, else the CPU), wherever it was compiled."""
    from kiln.models.device import resolve_device

    device = resolve_device(device)

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    say = progress or (lambda _msg: None)
    root = Path(path)
    manifest = _read_manifest(root)
    check_versions(root, manifest["versions"])
    saved = manifest["options"]
    if dtype is not None:
        from kiln.models.loader import _resolve_dtype  # only here: it pulls in the transformers model stack

        dtype = str(_resolve_dtype(dtype, None)).removeprefix("torch.")
    asked = {**options, "backend": None if backend == "auto" else backend, "dtype": dtype}
    for name, value in asked.items():
        if value is not None and value != saved.get(name):
            raise ArtifactError(
                f"{root}: {name}={value!r} was fixed when this artifact was compiled "
                f"({saved.get(name)!r}); recompile from the HF directory to change it"
            )
    if max_model_len is not None and not 1 <= max_model_len <= saved["max_model_len"]:
        raise ArtifactError(
            f"{root}: max_model_len {max_model_len} is outside 1..{saved['max_model_len']}, "
            f"the length this artifact was compiled for"
        )
    say(f"verifying {len(manifest['files'])} files")
    verify(root, manifest["files"])
    model = manifest["model"]
    say(f"loading {WEIGHTS}")
    tensors = load_file(str(root / WEIGHTS), device=str(device))
    for alias, name in manifest["weights"]["aliases"].items():
        tensors[alias] = tensors[name]
    say(f"importing {FORWARD}")
    module = _module_tree(
        _import_forward(root), manifest["submodules"], tensors, set(manifest["weights"]["parameters"])
    )
    say("loading config and tokenizer")
    config = AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
    has_tokenizer = (root / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=trust_remote_code) if has_tokenizer else None
    compiled = CompiledModel(
        graph_module=module,  # type: ignore[arg-type]  # a plain Module running forward.py, .code is that file
        report=PassReport.from_dict(manifest["report"]),
        hf_config=config,
        kv_layouts=[KVLayout(**layout) for layout in model["kv_layouts"]],
        dtype=getattr(torch, saved["dtype"]),
        device=device,
        max_model_len=max_model_len or saved["max_model_len"],
        backend=saved["backend"],
        tokenizer=tokenizer,
        eos_token_ids=model["eos_token_ids"],
        kv_cache_dtype=model.get("kv_cache_dtype"),
    )
    compiled.generation_config = GenerationConfig.from_pretrained(root)
    setattr(
        compiled,
        KERNELS_ATTR,
        {
            name: (root / KERNELS / name).read_bytes() if kind == "binary" else (root / KERNELS / name).read_text()
            for name, kind in manifest["kernels"].items()
        },
    )
    return compiled
