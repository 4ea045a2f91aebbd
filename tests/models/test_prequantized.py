"""Pre-quantized GPTQ / AWQ checkpoints load into kiln's int4 op with their own codes, no GPTQ/AWQ library.

No quantization tool is installed, so the checkpoints are written here: a tiny random model's linears are
quantized by a small round-to-nearest reference and packed into the GPTQ and AWQ (gemm) tensor layouts by code
written from the formats' definitions, independently of kiln's packing. kiln must reproduce the reference's
dequantized weights exactly, and HF's logits and greedy tokens on a model holding those weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import hf_last_logits, run_prefill_then_decode
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import kiln
from kiln.models.prequantized import convert, parse_config
from kiln.ops import quant as Q
from kiln.passes.base import op_counts, op_name
from kiln.passes.fuse_common import param

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"q_k_v_proj_weight": ("q_proj", "k_proj", "v_proj"), "gate_up_proj_weight": ("gate_proj", "up_proj")}
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ gemm: the nibble at shift 4*i holds column 8*j + order[i]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def rtn(w: torch.Tensor, group: int, sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference group-wise RTN of w [N, K]: codes [K, N] (0..15), fp16 scales [G, N], zero points [G, N]."""
    n, k = w.shape
    g = k if group == -1 else group
    x = w.double().numpy().reshape(n, k // g, g)
    if sym:  # GPTQ's symmetric grid: zero point 8, scale 2 * amax / 15
        scale = 2 * np.abs(x).max(-1) / 15
        zero = np.full(scale.shape, 8.0)
    else:  # [min(w, 0), max(w, 0)] onto 0..15
        lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
        scale = (hi - lo) / 15
        zero = np.clip(np.round(-lo / scale), 0, 15)
    scale16 = scale.astype(np.float16)  # what the checkpoint stores, and what dequantization uses
    codes = np.clip(np.round(x / scale16[..., None].astype(np.float64)) + zero[..., None], 0, 15)
    return codes.reshape(n, k).T.astype(np.int64), scale16.T.copy(), zero.T.astype(np.int64)


def dequant(codes: np.ndarray, scales16: np.ndarray, zeros: np.ndarray) -> torch.Tensor:
    """W [N, K] in fp32: (code - zero) * scale, one rounding, as any fp32 dequantizing kernel computes it."""
    rows = codes.shape[0] // scales16.shape[0]
    s = np.repeat(scales16.astype(np.float32), rows, 0)
    z = np.repeat(zeros, rows, 0)
    return torch.from_numpy(((codes - z).astype(np.float32) * s).T.copy())


def pack(v: np.ndarray, axis: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Eight 4-bit values per int32 along `axis`: the nibble at shift 4*i holds element 8*j + order[i]."""
    v = np.moveaxis(v.astype(np.uint32) & 0xF, axis, 0)
    words = np.zeros((v.shape[0] // 8, *v.shape[1:]), dtype=np.uint32)
    for i, src in enumerate(order):
        words |= v[src::8] << np.uint32(4 * i)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(words, 0, axis)).view(np.int32))


def write_quantized(
    base: Path, out: Path, method: str, group: int, sym: bool = False, permute_g_idx: bool = False, **config: object
) -> dict[str, torch.Tensor]:
    """A GPTQ (v1) or AWQ (gemm) copy of `base`; returns the reference dequantized weight of each linear."""
    shutil.copytree(base, out)
    tensors = load_file(str(base / "model.safetensors"))
    ref: dict[str, torch.Tensor] = {}
    for name in [k for k in tensors if k.endswith("_proj.weight")]:
        prefix = name[: -len("weight")]
        w = tensors.pop(name)
        codes, scales, zeros = rtn(w, group, sym)
        ref[name] = dequant(codes, scales, zeros)
        k = codes.shape[0]
        if method == "gptq":  # qweight [K/8, N] along K; qzeros [G, N/8] along N, storing zero - 1 (v1)
            g_idx = np.arange(k) // (k if group == -1 else group)
            if permute_g_idx:  # act-order: input channels regrouped out of order
                g_idx = np.random.default_rng(0).permutation(g_idx)
            tensors |= {
                prefix + "qweight": pack(codes, 0),
                prefix + "qzeros": pack(zeros - 1, 1),
                prefix + "g_idx": torch.from_numpy(g_idx.astype(np.int32)),
            }
        else:  # qweight [K, N/8] and qzeros [G, N/8], both along N in AWQ's interleaved order
            tensors |= {
                prefix + "qweight": pack(codes, 1, AWQ_PACK_ORDER),
                prefix + "qzeros": pack(zeros, 1, AWQ_PACK_ORDER),
            }
        tensors[prefix + "scales"] = torch.from_numpy(scales)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    qc = (
        {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group,
            "sym": sym,
            "desc_act": permute_g_idx,
            "damp_percent": 0.01,
            "true_sequential": True,
        }
        if method == "gptq"
        else {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    )
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {**qc, **config}
    (out / "config.json").write_text(json.dumps(cfg))
    return ref


def hf_with(base: Path, ref: dict[str, torch.Tensor]) -> torch.nn.Module:
    """HF's model of `base` with its linears replaced by the reference's dequantized weights."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, w in ref.items():
            model.get_parameter(name).copy_(w)
    return model


CASES = [
    ("gptq", "llama", 32, False),
    ("gptq", "qwen2", -1, True),
    ("awq", "llama", 64, False),
    ("awq", "qwen2", 32, False),
]


@pytest.mark.parametrize("method,arch,group,sym", CASES, ids=[f"{m}-{a}-g{g}" for m, a, g, _ in CASES])
def test_checkpoint_codes_logits_and_tokens_match_the_reference(
    checkpoint, tmp_path: Path, method: str, arch: str, group: int, sym: bool
) -> None:
    base = checkpoint(arch)
    ref = write_quantized(base, tmp_path / "q", method, group, sym)
    llm = kiln.LLM(tmp_path / "q", num_kv_blocks=32)
    compiled = llm.model
    report = compiled.report.quantization
    assert report["prequantized"] == {
        "method": method,
        "bits": 4,
        "group_size": group,
        "sym": sym,
        "checkpoint_format": "gptq" if method == "gptq" else "gemm",
        "linears": 14,
    }
    assert f"weights pre-quantized in the checkpoint: method={method}, bits=4" in compiled.report.format()
    gm, checked = compiled.graph_module, 0
    assert op_counts(gm)["kiln.linear_int4"] == 8  # q/k/v, o, gate/up, down per layer
    head = [param(gm, n) for n in gm.graph.nodes if n.op == "get_attr" and "lm_head" in n.target]
    assert head and all(t.is_floating_point() for t in head)  # not packed in the checkpoint: stays float

    # (a) each int4 op (fused ones included) holds exactly the reference's dequantized weights
    for node in gm.graph.nodes:
        if op_name(node) != "kiln.linear_int4":
            continue
        _, qweight, scales, qzeros, input_scale, _, group_size = (
            param(gm, a) if getattr(a, "op", None) == "get_attr" else a for a in node.args
        )
        dotted = node.args[1].meta["qualified_name"]  # flatten_attrs keeps the dotted path here
        owner, _, leaf = dotted.removeprefix("model.").removesuffix("_qweight").rpartition(".")
        parts = [f"{owner}.{p}.weight" for p in FUSED[leaf]] if leaf in FUSED else [f"{owner}.{leaf}"]
        want = torch.cat([ref[p] for p in parts]).t()
        assert input_scale is None and group_size == (want.shape[0] if group == -1 else group)
        assert (qzeros is None) == sym
        assert torch.equal(Q.dequantize_int4(qweight, scales, qzeros, group_size), want), parts
        checked += len(parts)
    assert checked == 14

    # (b) logits of a packed prefill and decode steps match HF over the dequantized weights
    hf = hf_with(base, ref)
    seqs, logits = run_prefill_then_decode(compiled, PROMPTS, steps=3)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for step, got in enumerate(logits):
        for s, prompt in enumerate(PROMPTS):
            tokens = seqs[s][: len(prompt) + step]
            want = hf_last_logits(hf, tokens)
            torch.testing.assert_close(got[s], want, atol=1e-4, rtol=1e-4)
            if step == 0:  # the comparison can tell quantized weights from the original ones
                assert (hf_last_logits(plain, tokens) - want).abs().max() > 1e-2

    # (c) greedy generation equals HF's on the dequantized model
    outs = llm.generate(PROMPTS, {"max_tokens": 6, "temperature": 0.0}, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        hf_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
        assert out.outputs[0].token_ids == hf_tokens.tolist()


def test_gptq_v2_zeros_and_fusing_a_symmetric_with_an_asymmetric_part() -> None:
    """gptq_v2 stores zero points without v1's -1; fused parts keep their codes, implicit 8s written out."""
    w = torch.randn(2, 48, 64, generator=torch.Generator().manual_seed(1))
    pre = parse_config(
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "checkpoint_format": "gptq_v2"}
    )
    refs = []
    for i, sym in enumerate((False, True)):
        codes, scales, zeros = rtn(w[i], 32, sym)
        refs.append(dequant(codes, scales, zeros))
        t = {"qweight": pack(codes, 0), "qzeros": pack(zeros, 1), "scales": torch.from_numpy(scales)}
        pre.linears[f"l{i}.weight"] = convert(pre, {f"l{i}." + k: v for k, v in t.items()}, f"l{i}.")
        assert torch.equal(pre.linears[f"l{i}.weight"].dequantize(), refs[-1].t())
    assert pre.linears["l1.weight"].qzeros is None  # all zero points 8: kiln's symmetric form
    fused = pre.lookup(["l0.weight", "l1.weight"])
    assert fused is not None and torch.equal(fused.dequantize(), torch.cat(refs).t())
    assert pre.lookup(["l0.weight", "other.weight"]) is None  # a float part keeps the fused linear float


REFUSED = [
    ("gptq", {"bits": 8}, "bits=8"),
    ("gptq", {"checkpoint_format": "marlin"}, "marlin"),
    ("gptq", {"quant_method": "exl2"}, "exl2"),
    ("gptq", {"dynamic": {"-:.*down_proj": {}}}, "dynamic"),
    ("awq", {"version": "gemv"}, "gemv"),
    ("awq", {"version": "exllama"}, "exllama"),
    ("awq", {"zero_point": False}, "zero_point"),
]


@pytest.mark.parametrize("method,override,match", REFUSED, ids=[m for _, _, m in REFUSED])
def test_unsupported_configs_are_refused_by_name(
    checkpoint, tmp_path: Path, method: str, override: dict, match: str
) -> None:
    write_quantized(checkpoint("llama"), tmp_path / "q", method, 32, **override)
    with pytest.raises(ValueError, match=match):
        kiln.compile(tmp_path / "q")


def test_act_order_and_a_second_quantization_are_refused(checkpoint, tmp_path: Path) -> None:
    write_quantized(checkpoint("llama"), tmp_path / "act", "gptq", 32, permute_g_idx=True)
    with pytest.raises(ValueError, match=r"act-order \(desc_act\) g_idx"):
        kiln.compile(tmp_path / "act")
    write_quantized(checkpoint("llama"), tmp_path / "q", "gptq", 32)
    with pytest.raises(ValueError, match="already quantized .gptq, 4-bit, group size 32, asymmetric"):
        kiln.compile(tmp_path / "q", quantization="int8")
