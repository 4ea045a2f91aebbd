"""Capture an HF causal LM with `torch.export` over one packed stream of tokens.

The captured signature is `(input_ids [T], positions [T]) -> logits [T, vocab]` with T dynamic, so one graph
serves prefill chunks and decode tokens of many sequences at once. Nothing here is architecture specific.

Capture never touches the device that holds the weights: it traces a twin of the model on the meta device,
then binds the real tensors (wherever they live) to the graph by name. So the graph is the same on a CPU and a
GPU, and a model compiled on a machine without a GPU serves from its artifact on one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from transformers import PreTrainedModel

# Guards torch.export would otherwise raise on for a dynamic token count become runtime asserts in the graph
# (the cleanup pass drops them). Without it torch 2.11 refuses every GQA family ("min(16*T, 32*T) == 16*T").
EXPORT_OPTIONS: dict[str, Any] = {"strict": False, "prefer_deferred_runtime_asserts_over_guards": True}


# Ops whose `device=` only restates where their input already is.
_CONVERSIONS = {
    torch.ops.aten.to.dtype_layout,
    torch.ops.aten._to_copy.default,
    torch.ops.aten._assert_tensor_metadata.default,
}


class _PackedStream(torch.nn.Module):
    """Presents a packed token stream to the HF model as a batch of one."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        return out.logits[0]


def _meta_twin(model: PreTrainedModel) -> PreTrainedModel:
    """The same architecture and config with every tensor on the meta device: shapes and dtypes, no data."""
    with torch.device("meta"):
        twin = type(model)(model.config)
    return twin.to(model.dtype).eval()  # type: ignore[arg-type]  # transformers' wrapped `to`


class _MetaScalars(TorchFunctionMode):
    """`torch.tensor(number, device=<meta>)` traced as `torch.full((), number)`: a factory op, retargeted to the
    weights' device like the others, instead of a constant whose value the meta device never held
    (transformers 5.17 builds the eager attention mask's zero that way; 5.24 calls `torch.zeros`)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if (
            func is torch.tensor
            and len(args) == 1
            and isinstance(args[0], (bool, int, float))
            and device is not None
            and torch.device(device).type == "meta"
        ):
            dtype = kwargs.get("dtype") or torch.tensor(args[0]).dtype  # the dtype torch.tensor would infer
            return torch.full((), args[0], dtype=dtype, device=device)
        return func(*args, **kwargs)


def _export(model: PreTrainedModel, max_model_len: int) -> fx.GraphModule:
    example = torch.arange(8, device="meta")
    tokens = torch.export.Dim("tokens", min=2, max=max(3, max_model_len))
    with torch.no_grad(), _MetaScalars():
        exported = torch.export.export(
            _PackedStream(model),
            (example, example.clone()),
            dynamic_shapes=({0: tokens}, {0: tokens}),
            **EXPORT_OPTIONS,
        )
    return exported.module()


def _bind(gm: fx.GraphModule, model: PreTrainedModel) -> None:
    """Replace each meta tensor the graph reads with the real model's tensor at the same path. Tensors the
    trace itself created (small constants) hold real values already and stay."""
    real: dict[str, torch.Tensor] = {f"model.{name}": t for name, t in model.named_parameters(remove_duplicate=False)}
    real.update({f"model.{name}": t for name, t in model.named_buffers(remove_duplicate=False)})
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        *parents, leaf = str(node.target).split(".")
        owner = gm.get_submodule(".".join(parents))
        value = getattr(owner, leaf)
        if not isinstance(value, torch.Tensor) or not value.is_meta:
            continue
        if node.target not in real:
            raise RuntimeError(f"capture: the graph reads {node.target}, which the model does not hold")
        tensor = real[node.target].detach()
        if isinstance(value, torch.nn.Parameter):
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = tensor
        else:
            setattr(owner, leaf, tensor)


def _retarget(gm: fx.GraphModule, device: torch.device) -> None:
    """Point what the trace recorded about the meta device (traced values, `device=` arguments) at the
    weights' device, so that the passes infer and evaluate on it. Conversions lose their `device=` (they then
    keep their input's); the factory calls that keep one are folded or removed by the passes, and the compiler
    checks that no device survives into the final graph."""
    for node in gm.graph.nodes:
        for val in pytree.tree_leaves(node.meta.get("val")):
            if isinstance(val, FakeTensor) and val.fake_device.type == "meta":
                val.fake_device = device
        if node.target is torch.ops.aten.to.device:  # to(x, device, dtype, ...): the same as to(x, dtype, ...)
            node.target, node.args = torch.ops.aten.to.dtype, (node.args[0], *node.args[2:])
            continue
        if not isinstance(node.kwargs.get("device"), torch.device):
            continue
        if node.target in _CONVERSIONS:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "device"}
        elif node.kwargs["device"].type == "meta":
            node.update_kwarg("device", device)


def device_constants(gm: fx.GraphModule) -> list[str]:
    """The nodes of `gm` that name a fixed device (none may survive compilation: artifacts are device-free)."""
    return [
        node.name
        for node in gm.graph.nodes
        if any(isinstance(v, torch.device) for v in pytree.tree_leaves((node.args, node.kwargs)))
    ]


def capture(model: PreTrainedModel, max_model_len: int) -> fx.GraphModule:
    """Export `model` and return a plain GraphModule taking (input_ids, positions) positionally, reading the
    model's own tensors on their own device."""
    unlifted = _export(_meta_twin(model), max_model_len)
    # A plain GraphModule over the same graph, without the pytree (un)flattening, input-check hooks and guards
    # torch.export wraps around it: the compiled graph takes positional tensors, and the runtime owns the contract.
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name="KilnForward")
    gm.graph._codegen = fx.graph.CodeGen()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0],)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    _bind(gm, model)
    _retarget(gm, model.device)
    gm.recompile()
    return gm
