"""The product of `kiln.compile`: the final FX graph plus what the runtime needs to drive it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from kiln.ops import quant
from kiln.ops.metadata import AttentionMetadata, step_context
from kiln.passes.base import PassReport


@dataclass(frozen=True)
class KVLayout:
    """Shape of one layer's paged cache: [num_blocks, block_size, kv_heads, head_dim] for K (v_head_dim for V)."""

    kv_heads: int
    head_dim: int
    v_head_dim: int


class CompiledModel:
    """A captured, rewritten model: `forward` runs one packed step over a paged KV cache."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        report: PassReport,
        hf_config: Any,
        kv_layouts: list[KVLayout],
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        backend: str,
        tokenizer: Any = None,
        eos_token_ids: list[int] | None = None,
        kv_cache_dtype: str | None = None,
    ) -> None:
        self.graph_module = graph_module
        self.report = report
        self.hf_config = hf_config
        self.kv_layouts = kv_layouts
        self.dtype = dtype
        self.device = device
        self.max_model_len = max_model_len
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids or []
        self.vocab_size = int(hf_config.vocab_size)
        self.kv_cache_dtype = kv_cache_dtype  # "int8" / "fp8_e4m3": vectors stored [D values | fp32 scale]
        self.generation_config: Any = None  # saved into artifacts as generation_config.json

    @property
    def num_layers(self) -> int:
        return len(self.kv_layouts)

    @property
    def num_kv_heads(self) -> int:
        return self.kv_layouts[0].kv_heads

    @property
    def head_dim(self) -> int:
        return self.kv_layouts[0].head_dim

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        """Bytes one block takes across all layers, K and V: what sizes the pool from a memory budget."""
        dtype, extra = self._cache_dtype()
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(
            block_size * lay.kv_heads * (lay.head_dim + lay.v_head_dim + 2 * extra) * elem for lay in self.kv_layouts
        )

    def _cache_dtype(self) -> tuple[torch.dtype, int]:
        """The cache element type and the elements each K/V vector carries beyond its values (its scale)."""
        if self.kv_cache_dtype is None:
            return self.dtype, 0
        return quant.KV_CACHE_DTYPES[self.kv_cache_dtype], quant.SCALE_BYTES

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        """Zeroed K and V caches for every layer, in the order the graph takes them."""
        caches = []
        dtype, extra = self._cache_dtype()
        for layout in self.kv_layouts:
            for dim in (layout.head_dim, layout.v_head_dim):
                caches.append(
                    torch.zeros(num_blocks, block_size, layout.kv_heads, dim + extra, dtype=dtype, device=self.device)
                )
        return caches

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """Run one step; returns float32 logits [R, vocab] for the tokens `meta.logits_indices` names (each
        sequence's last new token unless the runner asks for more rows)."""
        with step_context(meta):
            logits = self.graph_module(input_ids, positions, *meta.graph_inputs(), *kv_caches)
        if logits.shape[0] != meta.logits_indices.shape[0]:  # compiled with prune_logits=False
            logits = logits[meta.logits_indices]
        return logits.float()

    __call__ = forward

    @property
    def code(self) -> str:
        """The final forward as readable Python."""
        return self.graph_module.code
