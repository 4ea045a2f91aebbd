"""Plan of paged_attention.py.jinja: the attention half of kiln::paged_attention (vLLM's unified varlen
kernel: prefill with a cached prefix and decode in one kernel), plus the split-KV merge for decode.

Config by shape: decode tiles hold one token × the group's heads (padded to the 16 rows tl.dot needs); prefill
tiles pack up to 128 rows. Split-KV (flash-decoding) is chosen when the decode grid is too small to fill the GPU.
`choose` is the launcher's choice of both, which the cross-compile check reproduces for each target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kiln.ops.metadata import current_max_query_len

from ..kernel_plan import Config, Launch, Target, cdiv, device_target, ieee_dots, next_pow2, pick, run
from ..lowerings import lowers, unit_last
from ..model_step import MAX_BLOCKS_PER_SEQ, ModelStep, Planned, at_model_size
from ..render import interpreting
from ..signature import Kernel, const, index, ptr, scalar, size
from . import cache_write_plan

KERNEL = Kernel(
    "paged_attention",
    "kernel",
    (
        ptr("q_ptr"),
        ptr("k_cache_ptr"),
        ptr("v_cache_ptr"),
        ptr("out_ptr"),
        ptr("lse_ptr", "split"),
        index("block_tables_ptr"),
        index("seq_lens_ptr"),
        index("query_start_loc_ptr"),
        scalar("q_stride_t"),
        scalar("q_stride_h"),
        scalar("out_stride_t", ("split", False)),
        scalar("out_stride_h", ("split", False)),
        size("tables_stride"),
        scalar("scale"),
        scalar("softcap", "softcap"),
        scalar("window", "window"),
        const("KV_HEADS"),
        const("GROUP"),
        const("GROUP_P"),
        const("BLOCK_Q"),
        const("BLOCK_M"),
        const("BLOCK_N"),
        const("BLOCK_SIZE"),
        const("HEAD_D"),
        const("BLOCK_D"),
        const("HEAD_DV"),
        const("BLOCK_DV"),
        const("NUM_SPLITS"),
    ),
)
MERGE = Kernel(
    "paged_attention",
    "merge",
    (
        ptr("partial_ptr"),
        ptr("lse_ptr"),
        ptr("out_ptr"),
        scalar("out_stride_t"),
        scalar("out_stride_h"),
        scalar("n_heads"),
        const("HEAD_DV"),
        const("BLOCK_DV"),
        const("NUM_SPLITS"),
    ),
)
REFERENCE = "kiln::paged_attention"
MAX_SPLITS = 16


def configs(max_query_len: int, group: int, head_dim: int, v_dim: int, dtype: torch.dtype) -> list[Config]:
    """Candidates, best first; `pick` takes the first whose shared memory bound fits the device.

    16-bit inputs run on tensor cores: 128-row prefill tiles up to head_dim 64, 64 rows above (sm_80 keeps Q, S
    and the accumulator in registers and spills at 128 × 128), and a one-stage fallback for what does not fit
    (head_dim 256 on sm_80). float32 dots are IEEE, on the FMA units with their operands in registers: 16 × 16
    tiles, the largest that spilled for no head_dim (16 to 256) or GQA group (1 to 8) on sm_80 or sm_90, with
    four warps for a decode at head_dim <= 32 (eight spilled at head_dim 16, group 2, under Triton 3.6)."""
    group_p, elem = next_pow2(group), dtype.itemsize
    block_d, block_dv = next_pow2(head_dim), next_pow2(v_dim)
    if ieee_dots(dtype):
        shapes = [(1, 16, 4 if block_d <= 32 else 8, 2)] if max_query_len == 1 else [(16, 16, 8, 2)]
    elif max_query_len == 1:
        shapes = [(1, 64, 4, 2), (1, 32, 4, 2)]
    else:
        shapes = [(128 if head_dim <= 64 else 64, 64, 8, 2), (64, 32, 8, 1)]
    out = []
    for rows, block_n, warps, stages in shapes:
        block_q = 1 if max_query_len == 1 else max(1, rows // group_p)
        block_m = max(16, block_q * group_p)
        # Q's tile, num_stages buffers of the K and V tiles the loop loads, and a float32 score tile (its
        # layout conversions and row reductions may go through shared memory while those buffers are live); or
        # the output's conversion after the loop, in the same space.
        loop = (block_m * block_d + stages * block_n * (block_d + block_dv)) * elem + block_m * block_n * 4
        shared = max(loop, block_m * block_dv * 4)
        out.append(Config({"BLOCK_Q": block_q, "BLOCK_M": block_m, "BLOCK_N": block_n}, warps, stages, shared))
    return out


def num_splits_for(num_seqs: int, kv_heads: int, max_query_len: int, sms: int | None) -> int:
    """Flash-decoding splits: enough programs for ~2 waves of the SMs, only for decode and only on a GPU."""
    if max_query_len != 1 or sms is None:
        return 1
    want = max(1, (2 * sms) // max(1, num_seqs * kv_heads))
    return min(MAX_SPLITS, 1 << (want.bit_length() - 1))


def choose(
    num_seqs: int,
    max_query_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    v_dim: int,
    dtype: torch.dtype,
    target: Target,
) -> tuple[Config, int]:
    """The config and split count a step runs with on `target`: what the launcher launches and the
    cross-compile check compiles, so the check cannot pass on a config the runtime would not pick."""
    config = pick(configs(max_query_len, heads // kv_heads, head_dim, v_dim, dtype), target.shared_limit)
    return config, num_splits_for(num_seqs, kv_heads, max_query_len, target.sms)


def plan(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    window: int,
    softcap: float,
    max_query_len: int,
    config: Config,
    num_splits: int = 1,
    partial: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> list[Launch]:
    """q/out [T, Hq, D/Dv] (unit last stride), caches [blocks, block_size, Hkv, D] contiguous. With splits > 1,
    `partial` [T, Hq, splits, Dv] and `lse` [T, Hq, splits] are float32 scratch and a merge launch follows."""
    num_heads, head_dim = q.shape[1:]
    _, block_size, kv_heads, _ = k_cache.shape
    v_dim = v_cache.shape[-1]
    group = num_heads // kv_heads
    split = num_splits > 1
    flags = {
        "split": split,
        "softcap": softcap > 0,
        "window": window > 0,
        "upcast": interpreting() and q.dtype == torch.bfloat16,
        "ieee": ieee_dots(q.dtype),
    }
    args = {
        "q_ptr": q,
        "k_cache_ptr": k_cache,
        "v_cache_ptr": v_cache,
        "block_tables_ptr": block_tables,
        "seq_lens_ptr": seq_lens,
        "query_start_loc_ptr": query_start_loc,
        "q_stride_t": q.stride(0),
        "q_stride_h": q.stride(1),
        "tables_stride": block_tables.stride(0),
        "scale": float(scale),
        "KV_HEADS": kv_heads,
        "GROUP": group,
        "GROUP_P": next_pow2(group),
        **config.blocks,
        "BLOCK_SIZE": block_size,
        "HEAD_D": head_dim,
        "BLOCK_D": next_pow2(head_dim),
        "HEAD_DV": v_dim,
        "BLOCK_DV": next_pow2(v_dim),
        "NUM_SPLITS": num_splits,
    }
    if split:
        args.update(out_ptr=partial, lse_ptr=lse)
    else:
        args.update(out_ptr=out, out_stride_t=out.stride(0), out_stride_h=out.stride(1))
    if softcap > 0:
        args["softcap"] = float(softcap)
    if window > 0:
        args["window"] = int(window)
    grid = (seq_lens.shape[0], cdiv(max_query_len, config.blocks["BLOCK_Q"]), kv_heads * num_splits)
    launches = [Launch(KERNEL, flags, args, grid, config.num_warps, config.num_stages)]
    if split:
        merge_args = {
            "partial_ptr": partial,
            "lse_ptr": lse,
            "out_ptr": out,
            "out_stride_t": out.stride(0),
            "out_stride_h": out.stride(1),
            "n_heads": num_heads,
            "HEAD_DV": v_dim,
            "BLOCK_DV": next_pow2(v_dim),
            "NUM_SPLITS": num_splits,
        }
        launches.append(Launch(MERGE, flags, merge_args, (q.shape[0], num_heads), 2, 1))
    return launches


@at_model_size
def model_step_launches(step: ModelStep) -> list[Planned]:
    """The step's attention (and the split-KV merge when the launcher would split), with the config and split
    count the launcher chooses for the step's target."""
    s, t, seqs = step.shapes, step.tokens, step.seqs
    config, splits = choose(seqs, step.query_len, s.heads, s.kv_heads, s.head_dim, s.head_dim, step.dtype, step.target)
    q = step.tensor(t, s.heads, s.head_dim)
    k_cache, v_cache = (step.tensor(4096, step.block_size, s.kv_heads, s.head_dim) for _ in range(2))
    partial = step.tensor(t, s.heads, splits, s.head_dim, dtype=torch.float32)
    lse = step.tensor(t, s.heads, splits, dtype=torch.float32)
    tables = step.tensor(seqs, MAX_BLOCKS_PER_SEQ, dtype=torch.int32)
    attention, *merge = plan(
        q,
        k_cache,
        v_cache,
        q,
        tables,
        step.tensor(seqs, dtype=torch.int32),
        step.tensor(seqs + 1, dtype=torch.int32),
        s.head_dim**-0.5,
        s.window,
        s.softcap,
        step.query_len,
        config,
        splits,
        partial,
        lse,
    )
    return [Planned("attention", step.name, attention, config.shared_bytes)] + [
        Planned("attention_merge", step.name, launch) for launch in merge
    ]


# The launcher: the op's exact contract, called by backend "triton" in place of the op ---------------


@lowers("kiln.paged_attention")
def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    window: int,
    softcap: float,
    num_splits: int | None = None,
) -> Tensor:
    """kiln::paged_attention: write the step's K/V into the cache, then attend. `num_splits` overrides the
    split-KV choice (tests exercise the merge under the interpreter with it)."""
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    run(cache_write_plan.plan(k, v, k_cache, v_cache, slot_mapping))
    tokens, heads, _ = q.shape
    num_seqs = seq_lens.shape[0]
    # A decode step (one token per sequence) needs no host sync: that keeps it capturable in a CUDA graph.
    # The runner passes the longest query as a host integer; reading it back from the device (a sync) is the
    # fallback for callers that build metadata by hand. A decode step is 1 either way (CUDA graphs rely on it).
    max_q = (
        1 if tokens == num_seqs else current_max_query_len() or int((query_start_loc[1:] - query_start_loc[:-1]).max())
    )
    kv_heads, v_dim = k_cache.shape[2], v_cache.shape[-1]
    target = device_target(q.device)
    config, splits = choose(num_seqs, max_q, heads, kv_heads, q.shape[-1], v_dim, q.dtype, target)
    splits = num_splits or splits
    out = torch.empty(tokens, heads, v_dim, dtype=q.dtype, device=q.device)
    partial = lse = None
    if splits > 1:
        partial = torch.empty(tokens, heads, splits, v_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(tokens, heads, splits, dtype=torch.float32, device=q.device)
    for launch in plan(
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        window,
        softcap,
        max_q,
        config,
        splits,
        partial,
        lse,
    ):
        run(launch)
    return out
