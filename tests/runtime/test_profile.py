"""`kiln profile` on the CPU: every op the graph launches gets a row, costs follow the shapes, the per-op times add
up to about a step, the roofline PNG is written, and bad arguments are refused by name."""

from __future__ import annotations

import json

import pytest

import kiln
from kiln.passes.base import is_view, op_name
from kiln.runtime import profile as prof


@pytest.fixture(scope="module")
def compiled(checkpoint):
    return kiln.compile(checkpoint("llama"), device="cpu")


@pytest.fixture(scope="module")
def ceilings(compiled):
    return prof.measure_ceilings(compiled.device, compiled.dtype)


def test_every_launched_op_has_a_row_and_linear_costs_follow_the_shapes(compiled, ceilings):
    step = prof.profile_step(compiled, "decode", batch=3, new_tokens=1, context=20)
    rows = {r.name: r for r in step.rows}
    launched = {op_name(n) for n in compiled.graph_module.graph.nodes if n.op.startswith("call_")}
    assert set(rows) == launched
    hidden, inter, layers = 64, 128, 2
    # q/k/v (fused), o, gate/up (fused), down per layer + the LM head, at 3 rows each (float32 weights)
    weights = layers * (hidden * (4 * 16 + 2 * 2 * 16) + hidden * hidden + 3 * hidden * inter) + hidden * 512
    linear = rows["aten.linear"]
    assert linear.calls == 4 * layers + 1
    assert linear.flops == 2 * 3 * weights
    assert linear.bytes >= 4 * weights  # every weight read once, plus activations
    attention = rows["kiln.paged_attention"]
    # decode reads each sequence's 21 cached K and V vectors of 2 KV heads x 16, per layer
    assert attention.bytes >= layers * 3 * 21 * 2 * 32 * 4
    assert all(r.bytes == 0 for r in step.rows if r.name.split(".")[-1] in ("view", "transpose", "getitem"))
    assert any(is_view(n) for n in compiled.graph_module.graph.nodes)
    total = sum(r.seconds for r in step.rows)
    assert 0.2 * step.step_seconds < total < 20 * step.step_seconds
    table = prof.format_table(step, ceilings)
    assert "aten.linear" in table and "%BW" in table


def test_ceilings_are_measured(ceilings):
    assert ceilings.bandwidth > 1e8 and ceilings.flops > 1e8


def test_run_writes_the_roofline_png_and_json(compiled, tmp_path):
    pytest.importorskip("matplotlib", reason="the PNG needs the extra kiln[profile]")
    png, record = tmp_path / "roofline.png", tmp_path / "profile.json"
    text = prof.run(compiled, batch=2, prompt_len=8, context=16, png=png, json_path=record)
    assert text.count("step ") == 2 and "prefill" in text and "decode" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(record.read_text())
    assert [s["phase"] for s in data["steps"]] == ["decode", "prefill"]


@pytest.mark.parametrize(
    "kwargs, name", [({"batch": 0}, "batch"), ({"prompt_len": -1}, "prompt_len"), ({"context": 10**6}, "context")]
)
def test_bad_arguments_are_refused_by_name(compiled, kwargs, name):
    with pytest.raises(ValueError, match=name):
        prof.run(compiled, **kwargs)


def test_cli_prints_both_tables(checkpoint, capsys):
    from kiln.__main__ import main

    assert main(["profile", str(checkpoint("llama")), "--batch", "2", "--prompt-len", "4", "--context", "8"]) == 0
    out = capsys.readouterr().out
    assert "decode: batch 2 x 1" in out and "prefill: batch 2 x 4" in out
