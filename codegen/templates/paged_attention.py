"""Descriptor of paged_attention.py.jinja: the attention half of kiln::paged_attention (vLLM's unified varlen
kernel: prefill with a cached prefix and decode in one kernel), plus the split-KV merge for decode.

Config by shape: decode tiles hold one token × the group's heads (padded to the 16 rows tl.dot needs); prefill
tiles pack 64 rows. Split-KV (flash-decoding) is chosen when the decode grid is too small to fill the GPU.
"""
from __future__ import annotations

import torch

from kiln.codegen.launch import Config, Launch, cdiv, next_pow2
from kiln.codegen.render import interpreting

TEMPLATE = "paged_attention"
REFERENCE = "kiln::paged_attention"
MAX_SPLITS = 16


def configs(max_query_len: int, group: int, head_dim: int, v_dim: int, elem: int) -> list[Config]:
    """Candidates, best first; cross-compile prunes those that exceed shared memory or spill."""
    group_p = next_pow2(group)
    shapes = [(1, 64, 4, 2), (1, 32, 4, 2)] if max_query_len == 1 else [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 1)]
    out = []
    for rows, block_n, warps, stages in shapes:
        block_q = 1 if max_query_len == 1 else max(1, rows // group_p)
        block_m = max(16, block_q * group_p)
        smem = (block_m * next_pow2(head_dim) + block_n * (next_pow2(head_dim) + next_pow2(v_dim)) * stages) * elem
        out.append(Config({"BLOCK_Q": block_q, "BLOCK_M": block_m, "BLOCK_N": block_n}, warps, stages, smem))
    return out


def num_splits_for(num_seqs: int, kv_heads: int, max_query_len: int, device: torch.device) -> int:
    """Flash-decoding splits: enough programs for ~2 waves of the SMs, only for decode and only on a GPU."""
    if max_query_len != 1 or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (2 * sms) // max(1, num_seqs * kv_heads))
    return min(MAX_SPLITS, 1 << (want.bit_length() - 1))


def plan(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, window: int, softcap: float,
    max_query_len: int, config: Config, num_splits: int = 1,
    partial: torch.Tensor | None = None, lse: torch.Tensor | None = None,
) -> list[Launch]:
    """q/out [T, Hq, D/Dv] (unit last stride), caches [blocks, block_size, Hkv, D] contiguous. With splits > 1,
    `partial` [T, Hq, splits, Dv] and `lse` [T, Hq, splits] are float32 scratch and a merge launch follows."""
    num_heads, head_dim = q.shape[1:]
    _, block_size, kv_heads, _ = k_cache.shape
    v_dim = v_cache.shape[-1]
    group = num_heads // kv_heads
    split = num_splits > 1
    flags = {"split": split, "softcap": softcap > 0, "window": window > 0,
             "upcast": interpreting() and q.dtype == torch.bfloat16}
    args = [("q_ptr", q), ("k_cache_ptr", k_cache), ("v_cache_ptr", v_cache), ("out_ptr", partial if split else out)]
    if split:
        args.append(("lse_ptr", lse))
    args += [("block_tables_ptr", block_tables), ("seq_lens_ptr", seq_lens), ("query_start_loc_ptr", query_start_loc),
             ("q_stride_t", q.stride(0)), ("q_stride_h", q.stride(1))]
    if not split:
        args += [("out_stride_t", out.stride(0)), ("out_stride_h", out.stride(1))]
    args += [("tables_stride", block_tables.stride(0)), ("scale", float(scale))]
    if softcap > 0:
        args.append(("softcap", float(softcap)))
    if window > 0:
        args.append(("window", int(window)))
    constexprs = {"KV_HEADS": kv_heads, "GROUP": group, "GROUP_P": next_pow2(group), **config.blocks,
                  "BLOCK_SIZE": block_size, "HEAD_D": head_dim, "BLOCK_D": next_pow2(head_dim), "HEAD_DV": v_dim,
                  "BLOCK_DV": next_pow2(v_dim), "NUM_SPLITS": num_splits}
    grid = (seq_lens.shape[0], cdiv(max_query_len, config.blocks["BLOCK_Q"]), kv_heads * num_splits)
    launches = [Launch(TEMPLATE, flags, args, constexprs, grid, config.num_warps, config.num_stages)]
    if split:
        merge_args = [("partial_ptr", partial), ("lse_ptr", lse), ("out_ptr", out), ("out_stride_t", out.stride(0)),
                      ("out_stride_h", out.stride(1)), ("n_heads", num_heads)]
        merge_constexprs = {"HEAD_DV": v_dim, "BLOCK_DV": next_pow2(v_dim), "NUM_SPLITS": num_splits}
        launches.append(Launch(TEMPLATE, flags, merge_args, merge_constexprs, (q.shape[0], num_heads), 2, 1, "merge"))
    return launches
