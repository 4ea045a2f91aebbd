"""fuse_regions: leftover pointwise ops become one region each, without cycles and keeping shared results."""

from __future__ import annotations

import torch
from test_fuse_linears import assert_same_logits, only
from torch.fx.experimental.proxy_tensor import make_fx

import kiln
from kiln.passes.base import op_counts
from kiln.passes.fuse_regions import FuseRegions


def test_gpt2_tanh_gelu_is_one_region_per_layer(checkpoint):
    path = checkpoint("gpt2")  # GELU written out as pow / mul / add / tanh arithmetic
    plain, fused = kiln.compile(path, **only()), kiln.compile(path, **only("fuse_regions"))
    after = op_counts(fused.graph_module)
    assert op_counts(plain.graph_module)["aten.tanh"] == 2 and after["aten.tanh"] == 0
    regions = [n for n in fused.graph_module.graph.nodes if n.op == "call_module"]
    assert after["region"] == len(regions) >= 2
    described = [n.meta["kiln_region"] for n in regions if "aten.tanh" in n.meta["kiln_region"]["ops"]]
    assert len(described) == 2 and all(d["inputs"] and d["outputs"] for d in described)
    assert "torch.ops.aten.tanh" in getattr(fused.graph_module, regions[0].target).code + "".join(
        getattr(fused.graph_module, r.target).code for r in regions
    )
    assert_same_logits(plain, fused)


def _diamond(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    a = (x + 1) * 3
    m = torch.mm(a, w)  # not pointwise: a -> m -> b must not put a and b in one region
    return (a * m).tanh()


def test_no_cycle_and_shared_intermediates_kept():
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    gm = make_fx(_diamond)(x, w)
    counters = FuseRegions().run(gm, None)
    gm.graph.lint()
    gm.recompile()
    assert counters == {"regions": 2, "ops_fused": 4}
    ops = op_counts(gm)
    assert ops["region"] == 2 and ops["aten.mm"] == 1 and ops["aten.add"] == ops["aten.tanh"] == 0
    first = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert len(first.meta["kiln_region"]["outputs"]) == 1 and len(first.users) == 2  # `a` feeds mm and the mul
    torch.testing.assert_close(gm(x, w), _diamond(x, w))
