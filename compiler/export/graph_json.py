"""The final FX graphs as data (`graph.json`), rebuilt at load without running anything from the artifact.

Why kiln's own JSON rather than torch.export's serializer: the graph an artifact holds is not an
ExportedProgram. After the passes it calls plain Python functions (the launchers of backend "triton", the
C-backed functions of backend "reference", `operator.getitem`) and `region_N` submodules, which torch.export's
schema cannot describe; and its deserializer resolves targets on its own terms. This format covers exactly
what kiln's graphs hold, every target is resolved through `graph_targets.resolve` (an allowlist), and the
file stays readable next to `forward.py`.

Layout: {"format": 1, "modules": {dotted path ("" = root): [node, ...]}}; a node is {"name", "op", "target",
"args", "kwargs"}. Constants are JSON scalars and lists; everything else is a one-key object: {"node": name},
{"tuple": [...]}, {"dict": [[key, value], ...]}, {"slice": [start, stop, step]}, {"dtype": "float32"},
{"memory_format": ...}, {"layout": ...}, {"device": "cpu"}, {"float": "inf"} (non-finite floats).
"""

from __future__ import annotations

import keyword
import math
import re
from typing import Any

import torch
import torch.fx as fx

from .graph_targets import resolve, target_name

FORMAT = 1
OPS = ("placeholder", "get_attr", "call_function", "call_module", "output")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ATTR = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]*\Z")  # attribute names: no dunders
_TORCH_ENUMS = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}


class GraphDataError(ValueError):
    """A graph that this format cannot hold, or a description that does not make a valid graph."""


# Saving ------------------------------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if not all(type(k) is str for k in value):
            raise GraphDataError(f"a graph constant has non-string keys: {value!r}")
        return {"dict": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    for tag, kind in _TORCH_ENUMS.items():
        if isinstance(value, kind):
            return {tag: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise GraphDataError(f"a graph constant of type {type(value).__name__} cannot be saved: {value!r}")


def _node(node: fx.Node) -> dict[str, Any]:
    if node.op not in OPS:
        raise GraphDataError(f"node {node.name}: {node.op} nodes cannot be saved")
    target = target_name(node.target) if node.op == "call_function" else node.target
    return {
        "name": node.name,
        "op": node.op,
        "target": target,
        "args": _encode(tuple(node.args))["tuple"],
        "kwargs": _encode(dict(node.kwargs))["dict"],
    }


def describe(modules: dict[str, fx.GraphModule]) -> dict[str, Any]:
    """The JSON-ready description of {dotted path: graph module} (see `forward_source.graph_modules`)."""
    return {"format": FORMAT, "modules": {path: [_node(n) for n in gm.graph.nodes] for path, gm in modules.items()}}


# Loading -----------------------------------------------------------------------------------------------


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if value is None or type(value) in (bool, int, str, float):
        return value
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise GraphDataError(f"not a graph value: {value!r}")
    ((tag, body),) = value.items()
    if tag == "node":
        if body not in env:
            raise GraphDataError(f"a node refers to {body!r}, which no earlier node defines")
        return env[body]
    if tag == "tuple" and isinstance(body, list):
        return tuple(_decode(v, env) for v in body)
    if tag == "dict" and isinstance(body, list):
        if not all(isinstance(kv, list) and len(kv) == 2 and type(kv[0]) is str for kv in body):
            raise GraphDataError(f"malformed dict: {body!r}")
        return {k: _decode(v, env) for k, v in body}
    if tag == "slice" and isinstance(body, list) and len(body) == 3:
        return slice(*(_decode(v, env) for v in body))
    if tag == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if tag in _TORCH_ENUMS and isinstance(body, str) and _ATTR.match(body):
        found = getattr(torch, body, None)
        if isinstance(found, _TORCH_ENUMS[tag]):
            return found
    if tag == "device" and isinstance(body, str):
        try:
            return torch.device(body)
        except RuntimeError as err:
            raise GraphDataError(f"not a device: {body!r}") from err
    raise GraphDataError(f"not a graph value: {value!r}")


def _attr_path(target: Any) -> str:
    if not isinstance(target, str) or not all(_ATTR.match(part) for part in target.split(".")):
        raise GraphDataError(f"not an attribute path: {target!r}")
    return target


def _target(op: str, target: Any, path: str, paths: set[str]) -> Any:
    if op == "call_function":
        return resolve(target)
    if op == "placeholder":
        if not isinstance(target, str) or not _NAME.match(target) or keyword.iskeyword(target):
            raise GraphDataError(f"not an argument name: {target!r}")
        return target
    if op == "output":
        if target != "output":
            raise GraphDataError(f"output node with target {target!r}")
        return target
    _attr_path(target)
    if op == "call_module" and (f"{path}.{target}" if path else target) not in paths:
        raise GraphDataError(f"the graph at {path or 'the root'} calls {target}, which the description lacks")
    return target


def _graph(nodes: Any, path: str, paths: set[str]) -> fx.Graph:
    if not isinstance(nodes, list):
        raise GraphDataError(f"module {path!r}: nodes must be a list")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for data in nodes:
        if not isinstance(data, dict) or set(data) != {"name", "op", "target", "args", "kwargs"}:
            raise GraphDataError(f"module {path!r}: malformed node {data!r}")
        name, op = data["name"], data["op"]
        if op not in OPS:
            raise GraphDataError(f"node {name!r}: op {op!r} is not allowed")
        if not isinstance(name, str) or not _NAME.match(name) or name in env:
            raise GraphDataError(f"module {path!r}: bad or repeated node name {name!r}")
        args = _decode({"tuple": data["args"]}, env)
        kwargs = _decode({"dict": data["kwargs"]}, env)
        bad = [k for k in kwargs if not _NAME.match(k) or keyword.iskeyword(k)]
        if bad:  # FX writes keyword names into the code it generates as they are
            raise GraphDataError(f"node {name!r}: {bad[0]!r} is not a keyword argument name")
        node = graph.create_node(op, _target(op, data["target"], path, paths), args, kwargs, name=name)
        if node.name != name:
            raise GraphDataError(f"module {path!r}: node name {name!r} is not usable in a graph")
        env[name] = node
    graph.lint()
    return graph


def rebuild(data: Any) -> dict[str, fx.Graph]:
    """{dotted path: graph} from `describe`'s output; GraphDataError / TargetError for anything else."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("modules"), dict):
        raise GraphDataError(f"not a kiln graph description (format {FORMAT})")
    modules = data["modules"]
    if "" not in modules:
        raise GraphDataError("the graph description has no root graph")
    for path in modules:
        if path:
            _attr_path(path)
    return {path: _graph(nodes, path, set(modules)) for path, nodes in modules.items()}


def graph_modules(graphs: dict[str, fx.Graph]) -> dict[str, fx.GraphModule]:
    """GraphModules running `graphs`, deepest first, with empty stand-ins for the tensors they read: enough to
    regenerate their source and to take their (FX-generated) forward functions."""
    built: dict[str, fx.GraphModule] = {}
    for path in sorted(graphs, key=lambda p: -p.count(".") if p else 1):
        attrs: dict[str, Any] = {}
        for node in graphs[path].nodes:
            if node.op == "get_attr":
                attrs[node.target] = torch.empty(0)
            elif node.op == "call_module":
                attrs[node.target] = built[f"{path}.{node.target}" if path else node.target]
        built[path] = fx.GraphModule(attrs, graphs[path], class_name=path.rpartition(".")[2] or "KilnForward")
    return built
