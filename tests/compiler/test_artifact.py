"""Ahead-of-time artifacts: save, load in a fresh process with the same tokens, and refuse anything tampered."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import kiln
from kiln.compiler.export import artifact
from kiln.compiler.export.manifest import ArtifactError

PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 200], [1, 42]]
MAX_TOKENS = 8

# Generates greedily from the artifact, then checks that the capture and pass machinery was never imported.
_CHILD = """
import json, sys
import kiln
llm = kiln.LLM(sys.argv[1])
params = kiln.SamplingParams(max_tokens=int(sys.argv[2]), temperature=0.0)
print(json.dumps([o.outputs[0].token_ids for o in llm.generate(json.loads(sys.argv[3]), params, use_tqdm=False)]))
used = sorted(m for m in ("kiln.compiler.capture", "kiln.compiler.pipeline", "kiln.models.loader") if m in sys.modules)
assert not used, f"loading an artifact imported {used}"
"""


@pytest.fixture(scope="module")
def compiled(checkpoint) -> kiln.CompiledModel:
    return kiln.compile(str(checkpoint("llama")))


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifact.save(compiled, tmp_path_factory.mktemp("art") / "llama")


@pytest.fixture
def copy(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the artifact for a test to tamper with."""
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def test_fresh_process_generates_the_same_greedy_tokens(compiled, saved: Path) -> None:
    params = kiln.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    expected = [o.outputs[0].token_ids for o in kiln.LLM(compiled).generate(PROMPTS, params, use_tqdm=False)]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(saved), str(MAX_TOKENS), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout.strip().splitlines()[-1]) == expected


def test_quantized_artifact_keeps_its_tiled_weights_and_tokens(checkpoint, tmp_path: Path) -> None:
    quant = kiln.compile(str(checkpoint("llama")), quantization="w8a8", kv_cache_dtype="int8")
    loaded = kiln.load(artifact.save(quant, tmp_path / "w8a8"))
    assert loaded.kv_cache_dtype == "int8"
    tiled = dict(loaded.graph_module.named_buffers())["model_model_layers_0_mlp_down_proj_weight_qweight_tiled"]
    assert tiled.dtype.is_floating_point is False and tiled.dim() == 4
    params = kiln.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    runs = [
        [o.outputs[0].token_ids for o in kiln.LLM(m).generate(PROMPTS, params, use_tqdm=False)] for m in (quant, loaded)
    ]
    assert runs[0] == runs[1]


def test_loaded_model_keeps_the_compiled_interface(compiled, saved: Path) -> None:
    loaded = kiln.load(saved)
    assert loaded.report.to_dict() == compiled.report.to_dict()
    assert loaded.report.format() == compiled.report.format()
    assert loaded.kv_layouts == compiled.kv_layouts
    assert (loaded.dtype, loaded.max_model_len, loaded.backend) == (
        compiled.dtype,
        compiled.max_model_len,
        compiled.backend,
    )
    assert loaded.eos_token_ids == compiled.eos_token_ids
    assert loaded.tokenizer.encode("The kiln") == compiled.tokenizer.encode("The kiln")
    config = lambda model: {k: v for k, v in model.hf_config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert config(loaded) == config(compiled)
    assert "def forward(self, input_ids, positions" in loaded.code


def test_layout_is_readable_and_pickle_free(compiled, saved: Path) -> None:
    manifest = json.loads((saved / "manifest.json").read_text())
    assert set(manifest["versions"]) == {"kiln", "torch", "triton", "transformers"}
    assert {"forward.py", "weights.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(
        manifest["files"]
    )
    ast.parse((saved / "forward.py").read_text())
    read = {n.target for n in compiled.graph_module.graph.nodes if n.op == "get_attr"}
    with safe_open(str(saved / "weights.safetensors"), "pt") as f:
        assert set(f.keys()) | set(manifest["weights"]["aliases"]) == read
    for path in saved.rglob("*"):
        if path.is_file():
            assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"


def test_forward_source_imports_what_it_calls(saved: Path) -> None:
    """Backend "reference" calls each op's CPU-backed function or reference (and linears through the CPU backend's
    kernels) directly."""
    source = (saved / "forward.py").read_text()
    assert "from kiln.backends.cpu.lowering import paged_attention" in source
    assert "from kiln.backends.cpu.kernels import linear" in source
    assert "torch.ops.kiln." not in source


def test_one_corrupted_weight_byte_is_a_checksum_error(copy: Path) -> None:
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"checksum mismatch: weights\.safetensors changed"):
        kiln.load(copy)


def test_missing_file_is_refused(copy: Path) -> None:
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"checksum mismatch: missing file\(s\) tokenizer\.json"):
        kiln.load(copy)


def test_extra_file_is_refused(copy: Path) -> None:
    (copy / "kernels").mkdir()
    (copy / "kernels" / "evil.py").write_text("print('hi')\n")
    with pytest.raises(ArtifactError, match=r"checksum mismatch: extra file\(s\) kernels/evil\.py"):
        kiln.load(copy)


def test_missing_manifest_is_refused(copy: Path) -> None:
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        kiln.load(copy)


@pytest.mark.parametrize("package, version", [("torch", "1.0.0"), ("kiln", "9.9.0")])
def test_version_mismatch_is_refused(copy: Path, package: str, version: str) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["versions"][package] = version
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"version mismatch: compiled with {package} {version}"):
        kiln.load(copy)


def test_options_fixed_at_compile_time_are_refused(saved: Path) -> None:
    with pytest.raises(ArtifactError, match="dtype='float16' was fixed"):
        kiln.load(saved, dtype="float16")
    assert issubclass(ArtifactError, ValueError)


def test_kernels_hook_round_trips(compiled, tmp_path: Path) -> None:
    compiled.kernels = {"attention.py": "# generated\n", "bin/attention.cubin": b"\x7fELF\x00"}
    try:
        saved = artifact.save(compiled, tmp_path / "with-kernels")
    finally:
        del compiled.kernels
    assert kiln.load(saved).kernels == {"attention.py": "# generated\n", "bin/attention.cubin": b"\x7fELF\x00"}


@pytest.mark.skipif(not artifact.can_cross_compile(), reason="no kernel cross-compiler in this build")
def test_cross_compiled_kernels_are_saved_and_verified(checkpoint, tmp_path: Path) -> None:
    compiled = kiln.compile(str(checkpoint("llama")), backend="triton")  # a graph that launches generated kernels
    saved = artifact.save(compiled, tmp_path / "sm90", target="cuda:90")
    files = json.loads((saved / "manifest.json").read_text())["files"]
    assert any(name.startswith("kernels/sm_90/") and name.endswith(".cubin") for name in files)
    assert any(name.startswith("kernels/sm_90/") and name.endswith(".py") for name in files)
    assert kiln.load(saved).backend == compiled.backend


def test_failed_save_leaves_nothing_behind(compiled, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        artifact.save(compiled, tmp_path / "bad", target="no-such-target")
    assert not (tmp_path / "bad").exists()


def test_save_refuses_a_non_empty_directory(compiled, saved: Path) -> None:
    with pytest.raises(FileExistsError, match="not an empty directory"):
        artifact.save(compiled, saved)
