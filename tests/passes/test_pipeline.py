"""The pipeline is one list: what build_pipeline returns is what kiln.compile runs, in named stages."""

from __future__ import annotations

import pytest

import kiln
from kiln.compiler.pipeline import PASS_FLAGS, STAGES, build_pipeline, pipeline_stages
from kiln.passes.quant_config import QuantConfig
from kiln.passes.shard import ShardSpec


def test_the_list_built_is_the_list_that_runs(checkpoint):
    compiled = kiln.compile(checkpoint("llama"), fuse_rope=False)
    built = [p.name for p in build_pipeline({"fuse_rope": False})]
    assert [r.name for r in compiled.report.records] == built
    assert built[-3:] == ["final_cleanup", "lower_reference", "flatten_attrs"] and "fuse_rope" not in built


def test_stages_in_order_with_one_flag_per_optional_pass():
    names = ["cleanup", "attention", "sharding", "fusion", "quantization", "lowering", "flatten"]
    assert [stage for stage, _ in STAGES] == names
    stages = dict(pipeline_stages({}, QuantConfig.parse("int8"), backend="triton"))
    assert [p.name for p in stages["attention"]] == ["paged_attention", "prune_logits"]
    assert stages["sharding"] == []  # only with tensor_parallel_size > 1
    split = dict(pipeline_stages({}, None, shard=ShardSpec(1, 2)))
    assert [p.name for p in split["sharding"]] == ["shard"]
    assert [p.name for p in stages["quantization"]] == ["quantize"]
    assert [p.name for p in stages["lowering"]] == ["final_cleanup", "lower_triton"]
    assert set(PASS_FLAGS) == {
        "cleanup",
        "prune_logits",
        "fuse_linears",
        "fuse_activation",
        "fuse_norm",
        "fuse_rope",
        "fuse_regions",
        "quantize",
    }


def test_quantize_runs_only_when_asked():
    def names(**kw: object) -> list[str]:
        return [p.name for p in build_pipeline({}, **kw)]  # type: ignore[arg-type]

    assert "quantize" not in names() and "quantize" not in names(quant=QuantConfig.parse(None))
    assert "quantize" in names(quant=QuantConfig.parse(None, "int8"))
    assert "quantize" not in [p.name for p in build_pipeline({"quantize": False}, QuantConfig.parse("int8"))]


def test_unknown_flags_are_refused_by_name():
    with pytest.raises(ValueError, match="fuse_everything"):
        build_pipeline({"fuse_everything": True})
