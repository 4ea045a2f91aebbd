"""`kiln export`: a compiled model as an MLIR module (torch, linalg-on-tensors, StableHLO or TOSA) via torch-mlir.

Default (torch, linalg, stablehlo): one function `forward` for prefill and decode alike, as kiln's own graph is,
over a packed step whose sizes are all dynamic (tokens T, sequences S, blocks per sequence B, cache blocks N):

    forward(input_ids [T] i64, positions [T] i64, slot_mapping [T] i64, block_tables [S, B] i32,
            seq_lens [S] i32, query_start_loc [S + 1] i32, logits_indices [S] i64,
            k_cache_0 [N, block_size, Hkv, D], v_cache_0, ...)
        -> (logits [S, vocab], k_cache_0', v_cache_0', ...)

A decode step is the case T == S. The caches are values, not buffers: the step's K/V come back in the updated
caches, which the caller passes to the next step. block_size is fixed at export time; weights are inlined as
constants, so the module stands alone.

Static (`static=StaticShape(...)`, and always for TOSA, whose torch-mlir lowering needs static shapes): two
functions of the same signature, `prefill` (T = tokens) and `decode` (T = S = seqs); a caller pads to them.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .decompositions import decompose

if TYPE_CHECKING:
    from kiln.compiler.compiled import CompiledModel

FORMATS = {"torch": "torch", "linalg": "linalg-on-tensors", "stablehlo": "stablehlo", "tosa": "tosa"}
STATIC_ONLY = {"tosa"}
INSTALL_HINT = (
    "MLIR export needs torch-mlir: `make install-test` tries to install it, or run "
    "`pip install --no-deps torch-mlir==20261001 && pip install numpy packaging` "
    "(or `pip install 'kiln[mlir]'`)"
)
# What torch_mlir.fx.export_and_import runs between the FX import and the backend lowering.
_TO_BACKEND_CONTRACT = (
    "builtin.module(func.func(torch-match-quantized-custom-ops), "
    "torchdynamo-export-to-torch-backend-pipeline{ extra-library=})"
)


class MissingTorchMlir(RuntimeError):
    """torch-mlir is not installed; the message says how to get it."""


def require_torch_mlir() -> Any:
    """The torch_mlir package; MissingTorchMlir (saying how to install it) when it is absent."""
    try:
        import torch_mlir.fx
    except ImportError as exc:
        raise MissingTorchMlir(INSTALL_HINT) from exc
    return torch_mlir


@dataclass(frozen=True)
class StaticShape:
    """Sizes of a static export: prefill takes `tokens` tokens of `seqs` sequences, decode `seqs` tokens."""

    tokens: int = 128
    seqs: int = 4
    blocks_per_seq: int = 8
    num_blocks: int = 33


def example_step(
    compiled: CompiledModel,
    block_size: int,
    tokens: int = 8,
    seqs: int = 2,
    blocks_per_seq: int = 5,
    num_blocks: int = 11,
) -> tuple[torch.Tensor, ...]:
    """Step inputs of the given sizes to trace with; their values do not matter (nothing depends on them)."""

    def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=compiled.device)

    meta = (
        zeros(tokens),
        zeros(seqs, blocks_per_seq, dtype=torch.int32),
        zeros(seqs, dtype=torch.int32),
        zeros(seqs + 1, dtype=torch.int32),
        zeros(seqs),
    )
    return (zeros(tokens), zeros(tokens), *meta, *compiled.allocate_kv_cache(num_blocks, block_size))


def export_programs(
    compiled: CompiledModel, block_size: int = 16, static: StaticShape | None = None
) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of the decomposed graph: {"forward": dynamic} or {"prefill", "decode"} at `static` sizes."""
    if compiled.backend != "reference":
        raise ValueError(
            f"MLIR export starts from the reference graph; this model was compiled for "
            f"backend {compiled.backend!r} (compile it with backend='reference')"
        )
    if not isinstance(compiled.graph_module, torch.fx.GraphModule):
        raise ValueError("MLIR export needs the FX graph: compile the HF checkpoint, not a saved artifact")
    functional = decompose(compiled.graph_module)
    with torch.no_grad():
        if static is not None:
            sizes = {"prefill": static.tokens, "decode": static.seqs}
            return {
                name: torch.export.export(
                    functional,
                    example_step(compiled, block_size, tokens, static.seqs, static.blocks_per_seq, static.num_blocks),
                    strict=False,
                )
                for name, tokens in sizes.items()
            }
        Dim = torch.export.Dim
        tokens = Dim("tokens", min=1, max=max(2, compiled.max_model_len))
        seqs = Dim("seqs", min=1, max=max(2, compiled.max_model_len))
        width, blocks = Dim("blocks_per_seq", min=1), Dim("num_blocks", min=1)
        shapes = (
            {0: tokens},
            {0: tokens},
            {0: tokens},
            {0: seqs, 1: width},
            {0: seqs},
            {0: seqs + 1},
            {0: seqs},
            *([{0: blocks}] * (2 * compiled.num_layers)),
        )
        return {
            "forward": torch.export.export(
                functional, example_step(compiled, block_size), dynamic_shapes=shapes, strict=False
            )
        }


def to_mlir(programs: dict[str, torch.export.ExportedProgram], fmt: str = "linalg") -> Any:
    """One torch-mlir `Module` holding a function per program, lowered to `fmt` (a key of FORMATS)."""
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt in STATIC_ONLY and "forward" in programs:
        raise ValueError(f"format {fmt}: torch-mlir lowers it at static shapes only; export with a StaticShape")
    require_torch_mlir()
    from torch_mlir import ir
    from torch_mlir.compiler_utils import OutputType, lower_mlir_module, run_pipeline_with_repro_report
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table
    from torch_mlir.extras.fx_importer import FxImporter

    context = ir.Context()
    torch_d.register_dialect(context)
    importer = FxImporter(context=context)
    for name, program in programs.items():
        importer.import_frozen_program(program.run_decompositions(get_decomposition_table()), func_name=name)
    run_pipeline_with_repro_report(importer.module, _TO_BACKEND_CONTRACT, "Lowering TorchFX IR -> Torch Backend IR")
    return lower_mlir_module(False, OutputType.get(FORMATS[fmt]), importer.module)


def export_mlir(
    compiled: CompiledModel, fmt: str = "linalg", block_size: int = 16, static: StaticShape | None = None
) -> Any:
    """The model as a torch-mlir `Module` in `fmt`; `str(module)` is its text. TOSA is always static."""
    if fmt in STATIC_ONLY and static is None:
        static = StaticShape()
    return to_mlir(export_programs(compiled, block_size, static), fmt)


def write_mlir(
    compiled: CompiledModel,
    path: str | Path,
    fmt: str = "linalg",
    block_size: int = 16,
    static: StaticShape | None = None,
) -> Path:
    """Export and write the module's text (weights inlined as dense resources) to `path`."""
    module = export_mlir(compiled, fmt, block_size, static)
    path = Path(path)
    path.write_text(module.operation.get_asm(large_elements_limit=None))
    return path


# linalg-on-tensors -> LLVM, the way torch-mlir's RefBackend does it (its e2e-test package is not in the wheel;
# its refback-* passes are, registered by torchMlirRegisterAllPasses).
_LOWER_TO_LLVM = (
    "builtin.module("
    + ",".join(
        [
            "func.func(linalg-generalize-named-ops)",
            "func.func(linalg-fuse-elementwise-ops)",
            "convert-shape-to-std",
            "func.func(refback-generalize-tensor-pad)",
            "func.func(refback-generalize-tensor-concat)",
            "func.func(tm-tensor-bufferize)",
            "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
            "function-boundary-type-conversion=identity-layout-map}",
            "refback-mlprogram-bufferize",
            "func.func(buffer-deallocation-pipeline)",
            "inline",
            "refback-munge-calling-conventions",
            "func.func(tm-tensor-to-loops)",
            "func.func(refback-munge-memref-copy)",
            "func.func(convert-linalg-to-loops)",
            "func.func(lower-affine)",
            "convert-scf-to-cf",
            "func.func(refback-expand-ops-for-llvm)",
            "func.func(arith-expand)",
            "func.func(convert-math-to-llvm)",
            "convert-math-to-libm",
            "expand-strided-metadata",
            "finalize-memref-to-llvm",
            "lower-affine",
            "convert-bufferization-to-memref",
            "finalize-memref-to-llvm",
            "func.func(convert-arith-to-llvm)",
            "convert-vector-to-llvm",
            "convert-func-to-llvm",
            "convert-cf-to-llvm",
            "convert-complex-to-llvm",
            "reconcile-unrealized-casts",
        ]
    )
    + ")"
)
_RETURN_PREFIX = "refbackend_consume_func_return_"
_MEMREF_DTYPES = {
    "mrf16": "float16",
    "mrf32": "float32",
    "mrf64": "float64",
    "mri1": "bool",
    "mri8": "int8",
    "mri32": "int32",
    "mri64": "int64",
}  # numpy names


class LinalgExecutable:
    """A linalg-on-tensors module JIT-compiled to native code by MLIR's ExecutionEngine, called with tensors.

    This is how the export is verified by execution: `LinalgExecutable(export_mlir(m, "linalg")).run("forward",
    ...)` runs the MLIR, not torch.
    """

    def __init__(self, module: Any) -> None:
        torch_mlir = require_torch_mlir()
        import numpy as np
        from torch_mlir.compiler_utils import run_pipeline_with_repro_report
        from torch_mlir.execution_engine import ExecutionEngine
        from torch_mlir.runtime import UnrankedMemRefDescriptor, unranked_memref_to_numpy

        aggregate = os.path.join(os.path.dirname(torch_mlir._mlir_libs.__file__), "libTorchMLIRAggregateCAPI.so")
        ctypes.CDLL(aggregate).torchMlirRegisterAllPasses()  # the refback-* passes
        run_pipeline_with_repro_report(module, _LOWER_TO_LLVM, "Lowering linalg-on-tensors to LLVM")
        self._engine = ExecutionEngine(module)
        self._result: tuple[torch.Tensor, ...] | None = None
        self._callbacks = []  # ctypes callbacks must outlive the engine
        for op in module.body:
            name = str(op.attributes["sym_name"]).strip('"')
            if not name.startswith(_RETURN_PREFIX):
                continue
            kinds = name[len(_RETURN_PREFIX) :].split("_")
            if not all(kind in _MEMREF_DTYPES for kind in kinds):
                raise NotImplementedError(f"{name}: only tensor results of {', '.join(_MEMREF_DTYPES)}")
            dtypes = [np.dtype(_MEMREF_DTYPES[kind]) for kind in kinds]

            def consume(*memrefs: Any, dtypes: list = dtypes) -> None:
                # Copy out: the memrefs belong to the JIT-ed code.
                self._result = tuple(
                    torch.from_numpy(unranked_memref_to_numpy(m, d).copy()) for m, d in zip(memrefs, dtypes)
                )

            callback = ctypes.CFUNCTYPE(None, *[ctypes.POINTER(UnrankedMemRefDescriptor)] * len(kinds))(consume)
            self._callbacks.append(callback)
            self._engine.register_runtime(name, callback)

    def run(self, function: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Call `function` of the module (e.g. "forward"); returns its results as new CPU tensors."""
        from torch_mlir.runtime import get_unranked_memref_descriptor

        arrays = [t.detach().cpu().contiguous().numpy() for t in inputs]  # kept alive through the call
        descriptors = [ctypes.pointer(ctypes.pointer(get_unranked_memref_descriptor(a))) for a in arrays]
        self._engine.invoke(function, *descriptors)
        result, self._result = self._result, None
        if result is None:
            raise RuntimeError(f"the JIT-ed {function} returned nothing")
        return result
