"""Ahead-of-time artifacts: a compiled model saved as a directory that loads without tracing or passes.

Layout: `manifest.json` (versions, options, the pass report, the SHA-256 of every other file), `graph.json`
(the final FX graphs as data, graph_json.py), `forward.py` (the same graphs as plain Python, for people),
`weights.safetensors` (exactly the tensors that forward reads, after fusion/quantization), `kernels/` (whatever
the backend generated), the HF config, generation config and tokenizer files, and optionally `manifest.sig`.
Loading executes nothing from the artifact: nothing is pickled, the graphs are rebuilt from graph.json with
targets resolved through an allowlist (graph_targets.py), and forward.py must be exactly the source those
graphs generate, or the artifact is refused.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.fx as fx

import kiln.ops  # noqa: F401  (declares the kiln:: ops the forward calls)
from kiln.compiler.compiled import CompiledModel, KVLayout
from kiln.passes.base import PassReport

from .forward_source import SourceError, forward_source, graph_modules
from .graph_json import GraphDataError, describe, rebuild
from .graph_json import graph_modules as rebuilt_modules
from .graph_targets import TargetError
from .manifest import (
    FORMAT,
    FORWARD,
    GRAPH,
    KERNELS,
    MANIFEST,
    WEIGHTS,
    ArtifactError,
    check_versions,
    inside,
    read_manifest,
    sha256,
    verify,
    versions,
)
from .signing import check_signature, sign

# A backend that generates kernels attaches {relative name: source text or binary bytes} under this name.
KERNELS_ATTR = "kernels"

Progress = Callable[[str], None]


# Saving ------------------------------------------------------------------------------------------------


def _weights(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Every tensor the graphs read by attribute path; tied tensors are stored once, aliased by name."""
    read = {
        f"{path}.{n.target}" if path else str(n.target)
        for path, module in graph_modules(gm).items()
        for n in module.graph.nodes
        if n.op == "get_attr"
    }
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name in sorted(read):
        value = _get(gm, name)
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"the forward reads {name}, which is a {type(value).__name__}, not a tensor")
        value = value.detach()
        ptr = value.untyped_storage().data_ptr()
        key = (ptr, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = value.contiguous() if ptr not in storages else value.clone()  # safetensors: no overlaps
        storages.add(ptr)
    return tensors, sorted(read & params), aliases


def _get(root: torch.nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def save(
    compiled: CompiledModel,
    path: str | Path,
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    target: str | None = None,
    sign_key: str | Path | None = None,
) -> Path:
    """Write `compiled` as an artifact directory at `path` (which must not exist or be empty).

    target (e.g. "cuda:90"): also cross-compile every generated kernel for it (sources, cubins, records) into
    kernels/, with no GPU needed. `options` are recorded in the manifest as given. sign_key: a PEM ed25519
    private key; manifest.sig then signs the manifest (needs the `sign` extra).
    """
    say = progress or (lambda _msg: None)
    gm = compiled.graph_module
    if getattr(compiled, "tensor_parallel_size", 1) > 1:
        raise ArtifactError(
            "a tensor-parallel model holds one rank's share: save the artifact without tensor_parallel_size"
        )
    if not isinstance(gm, fx.GraphModule):
        raise ArtifactError("this model was loaded from an artifact already; copy that directory instead")
    root = Path(path)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root}: exists and is not an empty directory; refusing to overwrite")
    root.mkdir(parents=True, exist_ok=True)
    try:
        count = _write(compiled, gm, root, options or {}, say, target)
        if sign_key is not None:
            say(f"signing {MANIFEST}")
            sign(root, sign_key)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)  # it was empty or absent: leave no half-written artifact
        raise
    say(f"saved {root} ({count} files)")
    return root


def _write(
    compiled: CompiledModel, gm: fx.GraphModule, root: Path, options: dict[str, Any], say: Progress, target: str | None
) -> int:
    """Write every file, the manifest last; returns how many files the manifest lists."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    say(f"writing {FORWARD} and {GRAPH}")
    try:
        source, submodules = forward_source(gm)
        graph = describe(graph_modules(gm))
    except (SourceError, GraphDataError, TargetError) as err:
        raise ArtifactError(str(err)) from err
    _rebuilt(graph, source, submodules, root / FORWARD)  # what load will check, checked now
    (root / FORWARD).write_text(source)
    (root / GRAPH).write_text(json.dumps(graph, indent=1) + "\n")
    say(f"writing {WEIGHTS}")
    tensors, params, aliases = _weights(gm)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(root / WEIGHTS), metadata={"format": "pt"})
    kernels = dict(getattr(compiled, KERNELS_ATTR, None) or {})
    for name, content in kernels.items():
        file = root / KERNELS / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(content) if isinstance(content, bytes) else file.write_text(content)
    if target is not None:
        say(f"cross-compiling kernels for {target}")
        _cross_compile(compiled, target, root / KERNELS)
    say("writing config, generation config and tokenizer")
    compiled.hf_config.save_pretrained(root)
    generation = getattr(compiled, "generation_config", None) or GenerationConfig.from_model_config(compiled.hf_config)
    generation.save_pretrained(root)
    if compiled.tokenizer is not None:
        compiled.tokenizer.save_pretrained(root)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "versions": versions(),
        "options": {
            "backend": compiled.backend,
            "dtype": str(compiled.dtype).removeprefix("torch."),
            "max_model_len": compiled.max_model_len,
            **({"target": target} if target else {}),
            **options,
        },
        "model": {
            "kv_layouts": [vars(layout) for layout in compiled.kv_layouts],
            "eos_token_ids": compiled.eos_token_ids,
            "kv_cache_dtype": compiled.kv_cache_dtype,
        },
        "submodules": submodules,
        "weights": {"parameters": params, "aliases": aliases},
        "kernels": {name: "binary" if isinstance(c, bytes) else "text" for name, c in kernels.items()},
        "report": compiled.report.to_dict(),
        "files": {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return len(manifest["files"])


def can_cross_compile() -> bool:
    """Whether this kiln build has the codegen cross-compiler that `save(..., target=...)` needs."""
    return importlib.util.find_spec("kiln.codegen.cross_compile") is not None


def _cross_compile(compiled: CompiledModel, target: str, out_dir: Path) -> None:
    """Cubins for exactly the kernels the model's forward launches (codegen/graph_launches.py; codegen/aot.py
    loads them at serve time)."""
    if not can_cross_compile():
        raise ArtifactError(
            f"target {target!r}: this kiln build cannot cross-compile kernels (no kiln.codegen.cross_compile)"
        )
    from kiln.codegen.cross_compile import cross_compile, parse_target

    parse_target(target)  # a malformed target is refused before anything else is said
    if compiled.backend != "triton":
        raise ArtifactError(
            f"target {target!r}: this model was lowered for backend {compiled.backend!r}, which launches no "
            "generated kernels; compile it with backend 'triton' to ship cubins"
        )
    cross_compile(compiled, target=target, out_dir=out_dir)


# Loading -----------------------------------------------------------------------------------------------


def _rebuilt(graph: Any, source: str, submodules: Any, where: Path) -> dict[str, Callable[..., Any]]:
    """{dotted path: forward function} generated by FX from the described graphs, after checking that those
    graphs generate exactly `source` (the artifact's forward.py) with the same submodules."""
    try:
        modules = rebuilt_modules(rebuild(graph))
        regenerated, paths = forward_source(modules[""])
    except (GraphDataError, TargetError, SourceError) as err:
        raise ArtifactError(f"{where.parent}: {GRAPH}: {err}") from err
    if regenerated != source or paths != submodules:
        raise ArtifactError(f"{where}: forward.py does not match the graph it describes ({GRAPH})")
    return {path: type(module).forward for path, module in modules.items()}


def _child(owner: torch.nn.Module, path: list[str]) -> torch.nn.Module:
    """The module at `path` under `owner`, creating plain modules for missing levels."""
    for part in path:
        if part not in owner._modules:
            owner.add_module(part, torch.nn.Module())
        owner = cast(torch.nn.Module, owner._modules[part])
    return owner


def _module_tree(
    functions: dict[str, Callable[..., Any]], source: str, tensors: dict[str, torch.Tensor], params: set[str]
) -> torch.nn.Module:
    """Modules running the rebuilt graphs' forward functions, with the tensors at the dotted paths they read."""
    root = type("KilnForward", (torch.nn.Module,), {"forward": functions[""], "code": source})()
    for path, function in sorted(functions.items(), key=lambda item: item[0].count(".")):
        if not path:
            continue
        *parents, leaf = path.split(".")
        module = type(leaf, (torch.nn.Module,), {"forward": function})()
        _child(root, parents).add_module(leaf, module)
    for name, tensor in tensors.items():
        *parents, leaf = name.split(".")
        owner = _child(root, parents)
        if name in params:
            owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            owner.register_buffer(leaf, tensor)
    return root.eval()


def load(
    path: str | Path,
    *,
    backend: str = "auto",
    dtype: str | torch.dtype | None = None,
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    device: str | torch.device | None = "auto",
    trusted_key: str | Path | None = None,
    **options: bool,
) -> CompiledModel:
    """Start serving from an artifact: verify it, read the weights, rebuild the graphs. No tracing, no passes,
    no code from the artifact (trust_remote_code=True aside, which lets transformers run the config's code).

    An artifact records no device: its weights load straight onto `device` ("auto": the first CUDA GPU when
    there is one, else the CPU), wherever it was compiled. trusted_key: a PEM ed25519 public key; the artifact
    must then carry a valid manifest.sig by it (needs the `sign` extra)."""
    from kiln.models.device import resolve_device

    device = resolve_device(device)

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    say = progress or (lambda _msg: None)
    root = Path(path)
    manifest = read_manifest(root)
    if trusted_key is not None:
        say(f"checking the signature of {MANIFEST}")
        check_signature(root, trusted_key)
    check_versions(root, manifest["versions"])
    saved = manifest["options"]
    if dtype is not None:
        from kiln.models.loader import _resolve_dtype  # only here: it pulls in the transformers model stack

        dtype = str(_resolve_dtype(dtype, None)).removeprefix("torch.")
    asked = {**options, "backend": None if backend == "auto" else backend, "dtype": dtype}
    for name, value in asked.items():
        if value is not None and value != saved.get(name):
            raise ArtifactError(
                f"{root}: {name}={value!r} was fixed when this artifact was compiled "
                f"({saved.get(name)!r}); recompile from the HF directory to change it"
            )
    if max_model_len is not None and not 1 <= max_model_len <= saved["max_model_len"]:
        raise ArtifactError(
            f"{root}: max_model_len {max_model_len} is outside 1..{saved['max_model_len']}, "
            f"the length this artifact was compiled for"
        )
    say(f"verifying {len(manifest['files'])} files")
    verify(root, manifest["files"])
    if not isinstance(getattr(torch, str(saved["dtype"]), None), torch.dtype):
        raise ArtifactError(f"{root}: {MANIFEST}: dtype {saved['dtype']!r} is not a torch dtype")
    model = manifest["model"]
    say(f"rebuilding the graphs from {GRAPH}")
    try:
        graph = json.loads(inside(root, GRAPH).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{root}: {GRAPH}: cannot be read ({err})") from err
    source = inside(root, FORWARD).read_text()
    functions = _rebuilt(graph, source, manifest["submodules"], root / FORWARD)
    say(f"loading {WEIGHTS}")
    tensors = load_file(str(inside(root, WEIGHTS)), device=str(device))
    for alias, name in manifest["weights"]["aliases"].items():
        tensors[alias] = tensors[name]
    module = _module_tree(functions, source, tensors, set(manifest["weights"]["parameters"]))
    say("loading config and tokenizer")
    config = AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
    has_tokenizer = (root / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=trust_remote_code) if has_tokenizer else None
    compiled = CompiledModel(
        graph_module=module,  # type: ignore[arg-type]  # a plain Module running the rebuilt graphs, .code forward.py
        report=PassReport.from_dict(manifest["report"]),
        hf_config=config,
        kv_layouts=[KVLayout(**layout) for layout in model["kv_layouts"]],
        dtype=getattr(torch, saved["dtype"]),
        device=device,
        max_model_len=max_model_len or saved["max_model_len"],
        backend=saved["backend"],
        tokenizer=tokenizer,
        eos_token_ids=model["eos_token_ids"],
        kv_cache_dtype=model.get("kv_cache_dtype"),
    )
    compiled.generation_config = GenerationConfig.from_pretrained(root)
    if saved["backend"] == "triton":
        from kiln.codegen.aot import prepare

        prepare(root / KERNELS, saved.get("target"), manifest["versions"].get("triton"), device)
    setattr(
        compiled,
        KERNELS_ATTR,
        {
            name: inside(root, f"{KERNELS}/{name}").read_bytes()
            if kind == "binary"
            else inside(root, f"{KERNELS}/{name}").read_text()
            for name, kind in manifest["kernels"].items()
        },
    )
    return compiled
