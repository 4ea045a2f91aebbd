"""Device placement: one `device` argument, weights loaded straight onto it, and a graph that names no device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import kiln
from kiln.compiler import capture as capture_module
from kiln.compiler.capture import device_constants
from kiln.compiler.export import artifact
from kiln.compiler.export.manifest import FORWARD, MANIFEST
from kiln.models.device import resolve_device
from kiln.models.loader import load_model
from kiln.models.weights import load_safetensors_model

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 200]]


@pytest.fixture(scope="module")
def compiled(checkpoint) -> kiln.CompiledModel:
    return kiln.compile(str(checkpoint("llama")), device="auto")


def _greedy(model: object) -> list[list[int]]:
    params = kiln.SamplingParams(max_tokens=6, temperature=0.0)
    return [list(o.outputs[0].token_ids) for o in kiln.LLM(model).generate(PROMPTS, params, use_tqdm=False)]


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    for bad in ("tpu", "gpu0", "mps"):
        with pytest.raises(ValueError, match="^device: "):
            resolve_device(bad)


@NO_GPU
def test_cuda_without_a_gpu_is_a_value_error_naming_device(checkpoint, compiled, tmp_path: Path) -> None:
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="^device: .*no CUDA GPU"):
            kiln.LLM(str(checkpoint("llama")), device=device)
    with pytest.raises(ValueError, match="^device: "):
        kiln.load(artifact.save(compiled, tmp_path / "art"), device="cuda")


def test_auto_and_cpu_serve_the_same_tokens(checkpoint, compiled) -> None:
    assert compiled.device == resolve_device("auto")
    on_cpu = kiln.LLM(str(checkpoint("llama")), device="cpu")
    assert on_cpu.model.device == torch.device("cpu") and on_cpu.model.backend == "reference"
    assert _greedy(on_cpu.model) == _greedy(compiled)


def test_capture_traces_on_meta_with_deferred_asserts(checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.11 refuses GQA families over a dynamic token count unless guards become deferred asserts; only
    torch 2.13 is installed here, so this pins the mechanism instead of the failure."""
    seen: list[tuple[list[torch.device], dict]] = []
    real_export = torch.export.export

    def spy(module, args, **kwargs):
        seen.append(([a.device for a in args], kwargs))
        return real_export(module, args, **kwargs)

    monkeypatch.setattr(capture_module.torch.export, "export", spy)
    gm = capture_module.capture(load_model(str(checkpoint("qwen2"))).model, 64)  # GQA, like the failing families
    ((devices, kwargs),) = seen
    assert kwargs["prefer_deferred_runtime_asserts_over_guards"] is True and kwargs["strict"] is False
    assert devices == [torch.device("meta")] * 2
    tensors = [
        getattr(gm.get_submodule(".".join(n.target.split(".")[:-1])), n.target.split(".")[-1])
        for n in gm.graph.nodes
        if n.op == "get_attr"
    ]
    assert tensors and not any(t.is_meta for t in tensors if isinstance(t, torch.Tensor))


def test_compiled_graph_and_artifact_name_no_device(compiled, tmp_path: Path) -> None:
    assert device_constants(compiled.graph_module) == []
    root = artifact.save(compiled, tmp_path / "art")
    manifest = json.loads((root / MANIFEST).read_text())
    assert "device" not in manifest["model"]
    source = (root / FORWARD).read_text()
    assert "device(" not in source and "'cpu'" not in source
    for device in ("cpu", "auto"):
        loaded = kiln.load(root, device=device)
        assert loaded.device == resolve_device(device)
        assert _greedy(loaded) == _greedy(compiled)


def test_device_constants_finds_a_pinned_node() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    pinned = graph.call_function(torch.ops.aten.arange.default, (4,), {"device": torch.device("cpu")})
    graph.output(graph.call_function(torch.ops.aten.add.Tensor, (x, pinned)))
    assert device_constants(fx.GraphModule(torch.nn.Module(), graph)) == [pinned.name]


def test_safetensors_load_straight_into_the_model(checkpoint) -> None:
    path = checkpoint("llama")
    loaded = load_model(str(path), device="cpu").model
    direct = load_safetensors_model(path, loaded.config, torch.float32, "sdpa", torch.device("cpu"))
    assert direct is not None  # names and shapes are the model's own: no detour through transformers
    reference = AutoModelForCausalLM.from_pretrained(path).state_dict()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_legacy_tensor_names_go_through_transformers(checkpoint) -> None:
    path = checkpoint("gpt_neox")  # transformers 5.2x saves `embed_out`, renamed to `lm_head` on loading
    loaded = load_model(str(path), device="cpu").model
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        legacy = "embed_out.weight" in f.keys()
    direct = load_safetensors_model(path, loaded.config, torch.float32, "sdpa", torch.device("cpu"))
    assert (direct is None) == legacy
    reference = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(loaded.lm_head.weight, reference.lm_head.weight)


def test_a_number_made_into_a_meta_tensor_is_captured_as_an_op_not_a_valueless_constant() -> None:
    """transformers 5.17's eager attention mask calls torch.tensor(0.0, device=<the input's>): traced on the meta
    twin, that is a constant with no value to bind. Capture records it as a `full` call instead."""

    class Mask(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.where(x > 0, torch.tensor(0.0, device=x.device), -1.0)

    x = torch.randn(4, device="meta")
    with torch.no_grad(), capture_module._MetaScalars():
        gm = torch.export.export(Mask(), (x,), strict=False).module()
    calls = [n for n in gm.graph.nodes if n.op in ("get_attr", "call_function")]
    assert not any(n.op == "get_attr" for n in calls)
    (full,) = [n for n in calls if n.target is torch.ops.aten.full.default]
    assert full.args == ([], 0.0) and full.kwargs["dtype"] == torch.float32
