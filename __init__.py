"""kiln: compile a Hugging Face causal LM ahead of time into an inspectable serving engine.

Public faces: `kiln.compile`, `kiln.load`, `kiln.LLM`, `kiln.SamplingParams` (with `kiln.StructuredOutput`),
and `python -m kiln`.
Imports are lazy so that `python -m kiln --help` does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from kiln.version import __version__

_EXPORTS = {
    "compile": "kiln.compiler.api",
    "load": "kiln.compiler.api",
    "CompiledModel": "kiln.compiler.compiled",
    "LLM": "kiln.runtime.llm",
    "SamplingParams": "kiln.runtime.sampling_params",
    "StructuredOutput": "kiln.runtime.structured_output",
    "RequestOutput": "kiln.runtime.outputs",
    "CompletionOutput": "kiln.runtime.outputs",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
