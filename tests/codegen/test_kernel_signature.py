"""Each kernel's arguments are declared once: the template's signature is rendered from the declaration, a
launch's arguments are checked by name against it (missing, unexpected, wrong kind), each launcher declares the
kiln op it runs, and each plan declares its launches at a model's sizes for the cross-compile check."""

from __future__ import annotations

import ast

import pytest
import torch
import transformers

from kiln.codegen import lowerings
from kiln.codegen.cross_compile import TARGETS
from kiln.codegen.kernel_plan import Launch, run
from kiln.codegen.kernels import pointwise_plan, quant_matmul_plan, rms_norm_plan
from kiln.codegen.model_step import ModelShapes, ModelStep, step_launches
from kiln.codegen.signature import Kernel, const, declared, index, ptr, scalar, size


def _params(source: str, name: str) -> list[str]:
    """The parameter names of function `name` in a rendered source."""
    fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name)
    return [a.arg for a in fn.args.args]


def test_the_rendered_signature_is_the_declaration() -> None:
    x = torch.empty(4, 64)
    plain = rms_norm_plan.plan(x, x[0], x, 1e-5, 0.0)
    fused = rms_norm_plan.plan(x, x[0], x, 1e-5, 0.0, x, x)
    assert _params(plain.source(), "kernel") == [a.name for a in rms_norm_plan.KERNEL.arguments(plain.flags)]
    assert _params(fused.source(), "kernel") == [a.name for a in rms_norm_plan.KERNEL.arguments(fused.flags)]
    assert {"res_ptr", "res_stride"} <= set(_params(fused.source(), "kernel"))
    assert "res_ptr" not in _params(plain.source(), "kernel")
    # A template with several kernels renders each from its own declaration; the run order is the declaration's.
    rows = quant_matmul_plan.plan_quantize_rows(x, x, x[:, 0], x[0])
    assert (
        _params(rows.source(), "quantize_rows")
        == [a.name for a in quant_matmul_plan.QUANTIZE_ROWS.arguments(rows.flags)]
        == [name for name, _ in rows.bind()[0]] + ["BLOCK"]
    )
    assert set(declared("quant_matmul")) == {"kernel", "quantize_rows"}


def test_repeated_arguments_follow_the_list_flag() -> None:
    chain = pointwise_plan.Chain(("a", "b"), "a * b + s", ("s",))
    x = torch.empty(2, 8)
    launch = pointwise_plan.plan(chain, {"a": x, "b": x}, {"s": 1.0}, x)
    assert [name for name, _ in launch.bind()[0]] == [
        "a_ptr",
        "a_stride",
        "a_cstride",
        "b_ptr",
        "b_stride",
        "b_cstride",
        "out_ptr",
        "out_stride",
        "n_cols",
        "s",
    ]
    assert _params(launch.source(), "kernel")[:-1] == [name for name, _ in launch.bind()[0]]


def test_arguments_are_checked_by_name() -> None:
    x = torch.zeros(2, 16)
    launch = rms_norm_plan.plan(x, x[0], x, 1e-5, 0.0)
    missing = Launch(launch.kernel, launch.flags, {k: v for k, v in launch.args.items() if k != "eps"}, launch.grid)
    with pytest.raises(ValueError, match=r"kernel rms_norm\.kernel: missing argument\(s\) eps"):
        run(missing)
    extra = Launch(launch.kernel, launch.flags, {**launch.args, "res_ptr": x}, launch.grid)
    with pytest.raises(ValueError, match=r"kernel rms_norm\.kernel: unexpected argument\(s\) res_ptr"):
        run(extra)  # res_ptr is declared, but only with the residual flag
    wrong = Launch(launch.kernel, launch.flags, {**launch.args, "x_ptr": 3}, launch.grid)
    with pytest.raises(TypeError, match="argument x_ptr is a pointer, given a int"):
        run(wrong)


def test_a_kernel_is_declared_once_and_rendered_only_when_declared() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        Kernel("rms_norm", "kernel", (ptr("x_ptr"),))
    probe = Kernel("probe_only_in_this_test", "kernel", (ptr("x_ptr"), scalar("n", "sized"), const("BLOCK")))
    assert probe.header({"sized": False}) == "@triton.jit\ndef kernel(\n    x_ptr,\n    BLOCK: tl.constexpr,\n):"
    assert "n," in probe.header({"sized": True})


def test_sizes_and_indices_are_what_triton_does_not_specialise_on() -> None:
    probe = Kernel("probe_sizes_in_this_test", "kernel", (ptr("x_ptr"), index("pos_ptr"), size("M"), scalar("n")))
    assert probe.header({}).splitlines()[0] == (
        "@triton.jit(do_not_specialize=['M'], do_not_specialize_on_alignment=['pos_ptr'])"
    )
    with pytest.raises(TypeError, match="argument M is a size, given a float"):
        probe.bind({}, {"x_ptr": torch.empty(1), "pos_ptr": torch.empty(1), "M": 2.0, "n": 3})


def test_each_launcher_declares_the_op_it_runs() -> None:
    assert lowerings.lowerings()["kiln.rms_norm"] is rms_norm_plan.rms_norm
    assert lowerings.lowerings()["kiln.linear_int4"] is quant_matmul_plan.linear_int4
    assert {
        "kiln.add_rms_norm",
        "kiln.silu_mul",
        "kiln.gelu_mul",
        "kiln.rope",
        "kiln.paged_attention",
        "kiln.linear_int8",
        "kiln.linear_w8a8",
    } <= set(lowerings.lowerings())
    with pytest.raises(ValueError, match="kiln.rms_norm has two launchers"):
        lowerings.lowers("kiln.rms_norm")(lambda x: x)


def test_every_plan_declares_its_launches_at_model_size() -> None:
    config = transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        num_hidden_layers=1,
        vocab_size=100,
    )
    step = ModelStep(ModelShapes.from_config(config), torch.bfloat16, TARGETS[90], "decode_1", 1, 1, quantized=True)
    planned = step_launches(step)
    templates = {p.launch.kernel.template for p in planned}
    assert templates == {
        "cache_write",
        "gated_act",
        "matmul",
        "paged_attention",
        "pointwise",
        "quant_matmul",
        "rms_norm",
        "rope",
    }
    assert all(set(p.launch.bind()[1]) for p in planned)  # every launch binds against its declaration
