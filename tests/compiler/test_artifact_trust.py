"""Loading an artifact executes nothing from it: tampered code, foreign targets, paths that leave the
directory and (with a trusted key) unsigned or wrongly signed artifacts are all refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kiln
from kiln.compiler.export import artifact
from kiln.compiler.export.graph_json import GraphDataError, rebuild
from kiln.compiler.export.graph_targets import TargetError, resolve
from kiln.compiler.export.manifest import GRAPH, MANIFEST, ArtifactError, sha256


@pytest.fixture(scope="module")
def saved(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifact.save(kiln.compile(str(checkpoint("llama"))), tmp_path_factory.mktemp("trust") / "llama")


@pytest.fixture
def copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def _rehash(root: Path, edit=None) -> None:
    """What an attacker does after changing files: rewrite the manifest so that every hash matches again."""
    manifest = json.loads((root / MANIFEST).read_text())
    if edit is not None:
        edit(manifest)
    manifest["files"] = {
        p.relative_to(root).as_posix(): sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, "manifest.sig")
    }
    (root / MANIFEST).write_text(json.dumps(manifest))


def _edit_graph(root: Path, edit) -> None:
    graph = json.loads((root / GRAPH).read_text())
    edit(graph)
    (root / GRAPH).write_text(json.dumps(graph))
    _rehash(root)


def test_edited_forward_is_refused_and_never_runs(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    source = (copy / "forward.py").read_text()
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (copy / "forward.py").write_text(payload + source.replace("def forward(self", payload + "def forward(self", 1))
    _rehash(copy)
    child = subprocess.run(
        [sys.executable, "-c", "import sys, kiln; kiln.load(sys.argv[1])", str(copy)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode != 0
    assert "forward.py does not match the graph it describes" in child.stderr
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins.exec", "os.system", "subprocess.run", "torch.ops.os.system.default"])
def test_a_target_outside_the_allowlist_is_refused(copy: Path, target: str) -> None:
    def edit(graph):
        node = next(n for n in graph["modules"][""] if n["op"] == "call_function")
        node["target"] = target

    _edit_graph(copy, edit)
    with pytest.raises(ArtifactError, match=rf"target {target}\b.*not allowed|target {target}: no such op"):
        kiln.load(copy)


def test_allowlist_resolves_only_what_kiln_graphs_call() -> None:
    import operator

    import torch

    assert resolve("operator.getitem") is operator.getitem
    assert resolve("torch.ops.aten.linear.default") is torch.ops.aten.linear.default
    assert resolve("torch.ops.kiln.rms_norm.default") is torch.ops.kiln.rms_norm.default
    assert resolve("kiln.codegen.kernels.rms_norm_plan.rms_norm").__module__ == "kiln.codegen.kernels.rms_norm_plan"
    refused = (
        "operator.attrgetter",
        "kiln.codegen.lowerings.lowers",
        "kiln.codegen.kernels.rms_norm_plan.plan",
        "torch.ops.aten.__init__.default",
        "eval",
    )
    for name in refused:
        with pytest.raises(TargetError, match="not allowed"):
            resolve(name)


@pytest.mark.parametrize(
    "node",
    [
        {"name": "x", "op": "call_method", "target": "__class__", "args": [], "kwargs": []},
        {"name": "x = 1", "op": "placeholder", "target": "x", "args": [], "kwargs": []},
        {"name": "x", "op": "placeholder", "target": "x=__import__('os')", "args": [], "kwargs": []},
        {"name": "x", "op": "get_attr", "target": "__class__.__init__", "args": [], "kwargs": []},
        {"name": "x", "op": "call_module", "target": "region_9", "args": [], "kwargs": []},
        {"name": "x", "op": "placeholder", "target": "x", "args": [{"pickle": "..."}], "kwargs": []},
        {"name": "x", "op": "output", "target": "output", "args": [], "kwargs": [["a=print(1), b", 0]]},
    ],
)
def test_malformed_graph_descriptions_are_refused(node: dict) -> None:
    with pytest.raises((GraphDataError, TargetError)):
        rebuild({"format": 1, "modules": {"": [node]}})


def test_edited_graph_without_matching_forward_is_refused(copy: Path) -> None:
    def edit(graph):  # a valid, allowlisted change: the readable forward.py no longer says what runs
        node = next(n for n in graph["modules"][""] if n["target"] == "torch.ops.aten.view.default")
        node["target"] = "torch.ops.aten.reshape.default"

    _edit_graph(copy, edit)
    with pytest.raises(ArtifactError, match="forward.py does not match the graph it describes"):
        kiln.load(copy)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../../etc/passwd"])
def test_kernel_paths_outside_the_artifact_are_refused(copy: Path, name: str) -> None:
    _rehash(copy, lambda m: m["kernels"].update({name: "text"}))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        kiln.load(copy)


def test_file_paths_outside_the_artifact_are_refused(copy: Path) -> None:
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["../outside.txt"] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        kiln.load(copy)


def test_symlinks_leading_out_are_refused(copy: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("secret\n")
    (copy / "kernels").mkdir()
    (copy / "kernels" / "attention.py").symlink_to(secret)
    _rehash(copy, lambda m: m["kernels"].update({"attention.py": "text"}))
    with pytest.raises(ArtifactError, match="through a symlink"):
        kiln.load(copy)


# Signing ------------------------------------------------------------------------------------------------


def _keypair(directory: Path, name: str) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def test_trusted_key_refuses_unsigned_and_wrongly_signed_and_loads_signed(checkpoint, saved: Path, tmp_path: Path):
    ours, ours_pub = _keypair(tmp_path, "ours")
    theirs, _ = _keypair(tmp_path, "theirs")
    with pytest.raises(ArtifactError, match="unsigned artifact"):
        kiln.load(saved, trusted_key=ours_pub)
    compiled = kiln.compile(str(checkpoint("llama")))
    signed = artifact.save(compiled, tmp_path / "signed", sign_key=ours)
    assert (signed / "manifest.sig").is_file()
    assert kiln.load(signed, trusted_key=ours_pub).backend == compiled.backend
    assert kiln.load(signed).backend == compiled.backend  # no trusted key: the signature is not needed
    wrong = artifact.save(compiled, tmp_path / "wrong", sign_key=theirs)
    with pytest.raises(ArtifactError, match="not a valid signature"):
        kiln.load(wrong, trusted_key=ours_pub)
    tampered = Path(shutil.copytree(signed, tmp_path / "tampered"))
    _rehash(tampered, lambda m: m["options"].update({"note": "changed"}))
    with pytest.raises(ArtifactError, match="not a valid signature"):
        kiln.load(tampered, trusted_key=ours_pub)


def test_trusted_key_on_a_checkpoint_is_an_error(checkpoint, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a kiln artifact"):
        kiln.load(checkpoint("llama"), trusted_key=tmp_path / "key.pem")


def test_missing_cryptography_is_a_clear_error(saved: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives", None)
    with pytest.raises(ArtifactError, match=r"pip install 'kiln\[sign\]'"):
        kiln.load(saved, trusted_key=tmp_path / "key.pem")


def test_cli_signs_on_compile_and_checks_on_load(checkpoint, tmp_path: Path, capsys) -> None:
    from kiln.__main__ import main

    key, public = _keypair(tmp_path, "ours")
    _, other = _keypair(tmp_path, "other")
    art = tmp_path / "art"
    assert main(["compile", str(checkpoint("llama")), "-o", str(art), "--sign-key", str(key)]) == 0
    assert (art / "manifest.sig").is_file()
    generate = ["generate", str(art), "The kiln", "--max-tokens", "2", "--trusted-key"]
    assert main([*generate, str(other)]) == 2
    assert "not a valid signature" in capsys.readouterr().err
    assert main([*generate, str(public)]) == 0
    assert main(["generate", str(checkpoint("llama")), "The kiln", "--trusted-key", str(public)]) == 2
    assert "only artifacts carry signatures" in capsys.readouterr().err
