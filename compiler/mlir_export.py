"""`kiln export`: a compiled model as an MLIR module (torch, linalg-on-tensors, StableHLO or TOSA) via torch-mlir.

The exported function is one entry point for prefill and decode alike, as kiln's own graph is: `forward` over a
packed step with dynamic sizes (tokens T, sequences S, blocks per sequence B, cache blocks N),

    forward(input_ids [T] i64, positions [T] i64, slot_mapping [T] i64, block_tables [S, B] i32,
            seq_lens [S] i32, query_start_loc [S + 1] i32, logits_indices [S] i64,
            k_cache_0 [N, block_size, Hkv, D], v_cache_0, ...)
        -> (logits [S, vocab], k_cache_0', v_cache_0', ...)

A decode step is the case T == S. The caches are values, not buffers: the step's K/V come back in updated
caches, which the caller passes to the next step. block_size is fixed at export time. Weights are inlined as
constants, so the module stands alone.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .decompositions import decompose
from .metadata import AttentionMetadata

if TYPE_CHECKING:
    from .compiled import CompiledModel

FORMATS = {"torch": "torch", "linalg": "linalg-on-tensors", "stablehlo": "stablehlo", "tosa": "tosa"}
INSTALL_HINT = ("MLIR export needs torch-mlir: `make install` tries to install it, or run "
                "`pip install --no-deps torch-mlir==20261001 && pip install numpy packaging` "
                "(or `pip install 'kiln[mlir]'`)")


class MissingTorchMlir(RuntimeError):
    """torch-mlir is not installed; the message says how to get it."""


def require_torch_mlir() -> Any:
    """The torch_mlir package; MissingTorchMlir (saying how to install it) when it is absent."""
    try:
        import torch_mlir.fx
    except ImportError as exc:
        raise MissingTorchMlir(INSTALL_HINT) from exc
    return torch_mlir


def example_step(compiled: CompiledModel, block_size: int) -> tuple[torch.Tensor, ...]:
    """Inputs of a small prefill step (two sequences, more than one block each) to trace the export with."""
    tables = [[1, 3, 5], [2, 4, 6]]
    meta = AttentionMetadata.build([5, 3], [0, 0], tables, block_size, device=compiled.device)
    ids = torch.arange(8, device=compiled.device) % compiled.vocab_size
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], device=compiled.device)
    return (ids, positions, *meta.graph_inputs(), *compiled.allocate_kv_cache(7, block_size))


def export_program(compiled: CompiledModel, block_size: int = 16) -> torch.export.ExportedProgram:
    """torch.export of the decomposed graph, with every size of the step dynamic except block_size."""
    if compiled.backend != "reference":
        raise ValueError(f"MLIR export starts from the reference graph; this model was compiled for "
                         f"backend {compiled.backend!r} (compile it with backend='reference')")
    if not isinstance(compiled.graph_module, torch.fx.GraphModule):
        raise ValueError("MLIR export needs the FX graph: compile the HF checkpoint, not a saved artifact")
    Dim = torch.export.Dim
    tokens = Dim("tokens", min=1, max=max(2, compiled.max_model_len))
    seqs = Dim("seqs", min=1, max=max(2, compiled.max_model_len))
    width, blocks = Dim("blocks_per_seq", min=1), Dim("num_blocks", min=1)
    shapes = ({0: tokens}, {0: tokens}, {0: tokens}, {0: seqs, 1: width}, {0: seqs}, {0: seqs + 1},
              {0: seqs}, *([{0: blocks}] * (2 * compiled.num_layers)))
    with torch.no_grad():
        return torch.export.export(decompose(compiled.graph_module), example_step(compiled, block_size),
                                   dynamic_shapes=shapes, strict=False)


def export_mlir(compiled: CompiledModel, fmt: str = "linalg", block_size: int = 16) -> Any:
    """The model as a torch-mlir `Module` in `fmt` (a key of FORMATS); `str(module)` is its text."""
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    torch_mlir = require_torch_mlir()
    program = export_program(compiled, block_size)
    return torch_mlir.fx.export_and_import(program, output_type=FORMATS[fmt], func_name="forward")


def write_mlir(compiled: CompiledModel, path: str | Path, fmt: str = "linalg", block_size: int = 16) -> Path:
    """Export and write the module's text (weights inlined as dense resources) to `path`."""
    module = export_mlir(compiled, fmt, block_size)
    path = Path(path)
    path.write_text(module.operation.get_asm(large_elements_limit=None))
    return path


# linalg-on-tensors -> LLVM, the way torch-mlir's RefBackend does it (its e2e-test package is not in the wheel;
# its refback-* passes are, registered by torchMlirRegisterAllPasses).
_LOWER_TO_LLVM = "builtin.module(" + ",".join([
    "func.func(linalg-generalize-named-ops)", "func.func(linalg-fuse-elementwise-ops)", "convert-shape-to-std",
    "func.func(refback-generalize-tensor-pad)", "func.func(refback-generalize-tensor-concat)",
    "func.func(tm-tensor-bufferize)",
    "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map}",
    "refback-mlprogram-bufferize", "func.func(buffer-deallocation-pipeline)", "inline",
    "refback-munge-calling-conventions", "func.func(tm-tensor-to-loops)", "func.func(refback-munge-memref-copy)",
    "func.func(convert-linalg-to-loops)", "func.func(lower-affine)", "convert-scf-to-cf",
    "func.func(refback-expand-ops-for-llvm)", "func.func(arith-expand)", "func.func(convert-math-to-llvm)",
    "convert-math-to-libm", "expand-strided-metadata", "finalize-memref-to-llvm", "lower-affine",
    "convert-bufferization-to-memref", "finalize-memref-to-llvm", "func.func(convert-arith-to-llvm)",
    "convert-vector-to-llvm", "convert-func-to-llvm", "convert-cf-to-llvm", "convert-complex-to-llvm",
    "reconcile-unrealized-casts",
]) + ")"
_RETURN_PREFIX = "refbackend_consume_func_return_"
_MEMREF_DTYPES = {"mrf16": np.float16, "mrf32": np.float32, "mrf64": np.float64, "mri1": np.bool_,
                  "mri8": np.int8, "mri32": np.int32, "mri64": np.int64}


class LinalgExecutable:
    """A linalg-on-tensors module JIT-compiled to native code by MLIR's ExecutionEngine, called with tensors.

    This is how the export is verified by execution: `LinalgExecutable(export_mlir(m, "linalg")).forward(...)`
    runs the MLIR, not torch.
    """

    def __init__(self, module: Any) -> None:
        torch_mlir = require_torch_mlir()
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
            kinds = name[len(_RETURN_PREFIX):].split("_")
            if not all(kind in _MEMREF_DTYPES for kind in kinds):
                raise NotImplementedError(f"{name}: only tensor results of {', '.join(_MEMREF_DTYPES)}")
            dtypes = [_MEMREF_DTYPES[kind] for kind in kinds]

            def consume(*memrefs: Any, dtypes: list = dtypes) -> None:
                # Copy out: the memrefs belong to the JIT-ed code.
                self._result = tuple(torch.from_numpy(unranked_memref_to_numpy(m, d).copy())
                                     for m, d in zip(memrefs, dtypes))

            callback = ctypes.CFUNCTYPE(None, *[ctypes.POINTER(UnrankedMemRefDescriptor)] * len(kinds))(consume)
            self._callbacks.append(callback)
            self._engine.register_runtime(name, callback)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from torch_mlir.runtime import get_unranked_memref_descriptor

        arrays = [t.detach().cpu().contiguous().numpy() for t in inputs]  # kept alive through the call
        descriptors = [ctypes.pointer(ctypes.pointer(get_unranked_memref_descriptor(a))) for a in arrays]
        self._engine.invoke("forward", *descriptors)
        result, self._result = self._result, None
        if result is None:
            raise RuntimeError("the JIT-ed forward returned nothing")
        return result
