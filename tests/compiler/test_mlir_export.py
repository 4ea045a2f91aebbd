"""MLIR export (kiln.compiler.export.mlir_export): every tiny architecture exports in all four formats, and the
linalg-on-tensors module, JIT-compiled by MLIR's ExecutionEngine, reproduces the reference engine's logits and
cache writes for a packed prefill followed by decode steps."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import kiln
from kiln.__main__ import main
from kiln.compiler.export.decompositions import decompose, is_kiln_op
from kiln.compiler.export.mlir_export import FORMATS, LinalgExecutable, StaticShape, export_programs, to_mlir
from kiln.models.testing import TINY_CONFIGS
from kiln.ops.metadata import AttentionMetadata
from kiln.passes.base import op_name

needs_torch_mlir = pytest.mark.skipif(
    importlib.util.find_spec("torch_mlir") is None,
    reason="torch-mlir not installed (optional extra `mlir`; `make install-test`)",
)
BLOCK = 4
TABLES = [[1, 3, 5, 7], [2, 4, 6, 8]]  # interleaved, so a wrong block table shows
# qwen2_swa: a sliding-window layer beside a full one. (gemma2 runs too but ends ~1e-4 off: MLIR's LLVM lowering
# approximates tanh, which its softcaps and GELU use, by a polynomial; its decomposition is checked in torch below.)
EXECUTED = ["llama", "qwen2_swa"]


@pytest.fixture(scope="module")
def compiled(checkpoint):
    models: dict[str, kiln.CompiledModel] = {}

    def get(arch: str):
        if arch not in models:
            models[arch] = kiln.compile(checkpoint(arch), backend="reference")
        return models[arch]

    return get


def _steps(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]:
    """A packed prefill (7 and 3 tokens, past one block) and two decode steps of both sequences."""
    gen = torch.Generator().manual_seed(0)
    steps = [
        (
            torch.randint(4, vocab, (10,), generator=gen),
            torch.tensor([*range(7), *range(3)]),
            AttentionMetadata.build([7, 3], [0, 0], TABLES, BLOCK),
        )
    ]
    for ctx in ([7, 3], [8, 4]):
        steps.append(
            (
                torch.randint(4, vocab, (2,), generator=gen),
                torch.tensor(ctx),
                AttentionMetadata.build([1, 1], ctx, TABLES, BLOCK),
            )
        )
    return steps


def _compare(model, run) -> None:
    """`run(inputs)` -> (logits, *caches) must track the reference engine step by step, caches carried over."""
    ref_caches = model.allocate_kv_cache(9, BLOCK)
    caches = [c.clone() for c in ref_caches]
    for ids, pos, meta in _steps(model.vocab_size):
        expected = model(ids, pos, meta, ref_caches)
        logits, *caches = run((ids, pos, *meta.graph_inputs(), *caches))
        assert (logits - expected).abs().max().item() < 1e-4
        assert max((a - b).abs().max().item() for a, b in zip(caches, ref_caches)) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: GQA, softcapping, sliding windows
def test_decomposed_graph_is_pure_aten_and_matches_reference(compiled, arch):
    model = compiled(arch)
    functional = decompose(model.graph_module)
    assert not any(is_kiln_op(n.target) for n in functional.graph.nodes)
    assert any(op_name(n) == "kiln.paged_attention" for n in model.graph_module.graph.nodes)  # left untouched
    with torch.no_grad():
        _compare(model, lambda inputs: functional(*inputs))


@needs_torch_mlir
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_every_format_exports(compiled, arch):
    model = compiled(arch)
    dynamic = export_programs(model, BLOCK)
    static = export_programs(model, BLOCK, StaticShape(tokens=16, seqs=2, blocks_per_seq=4, num_blocks=9))
    for fmt in FORMATS:
        text = str(to_mlir(static if fmt == "tosa" else dynamic, fmt))
        if fmt == "tosa":
            assert (
                "func.func @prefill(%arg0: tensor<16xi64>" in text and "func.func @decode(%arg0: tensor<2xi64>" in text
            )
        elif fmt == "torch":
            assert "func.func @forward(%arg0: !torch.vtensor<[?],si64>" in text
        else:  # fully lowered, dynamic sizes: nothing of the torch dialect is left
            assert "func.func @forward(%arg0: tensor<?xi64>" in text
        if fmt != "torch":
            assert "torch.aten" not in text and "torch.vtensor" not in text, fmt


@needs_torch_mlir
@pytest.mark.parametrize("arch", EXECUTED)
def test_linalg_execution_matches_reference(compiled, arch):
    model = compiled(arch)
    executable = LinalgExecutable(to_mlir(export_programs(model, BLOCK), "linalg"))
    _compare(model, lambda inputs: executable.run("forward", *inputs))


def test_export_without_torch_mlir_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_mlir", None)  # makes `import torch_mlir` fail
    assert main(["export", str(tmp_path), "--format", "linalg", "-o", str(tmp_path / "m.mlir")]) == 2
    assert "pip install" in capsys.readouterr().err


@needs_torch_mlir
def test_cli_writes_the_module(checkpoint, tmp_path, capsys):
    out = tmp_path / "llama.mlir"
    assert main(["export", str(checkpoint("llama")), "--format", "stablehlo", "-o", str(out), "--block-size", "8"]) == 0
    text = out.read_text()
    assert "func.func @forward(" in text and "stablehlo." in text and "x8x2x16xf32>" in text
    assert "wrote" in capsys.readouterr().out
