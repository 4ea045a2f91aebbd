"""Replicas of one kiln engine on Ray Serve (`pip install kiln[ray]`): more traffic than one engine serves.

Each replica is a Ray Serve deployment replica that loads the model itself and serves kiln's own OpenAI app
(`server.build_app`: the same routes, validation, errors and streaming as `kiln serve`); Ray's proxy spreads the
requests over the replicas and its controller replaces a replica that dies or whose health check fails (a
tensor-parallel replica with a dead rank reports itself unhealthy); a request in flight on a replica that dies
fails at once, an HTTP 5xx in OpenAI's error shape (ray_proxy.py's middleware in Ray's proxy; some still come
as the proxy's bare "Internal Server Error") or a stream cut off before `data: [DONE]`. Ray's autoscaling config
passes through. Each replica owns its devices: `num_gpus` = tensor_parallel_size on GPU clusters, none on CPU-only ones.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .ray_proxy import PROXY_ENV
from .serving import ServerLimits

AUTOSCALING_KEYS = frozenset(
    {"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests", "upscale_delay_s",
     "downscale_delay_s", "metrics_interval_s", "look_back_period_s"}
)  # fmt: skip


def _serve() -> Any:
    try:
        return importlib.import_module("ray.serve")
    except ImportError as err:
        raise ValueError("--ray needs Ray Serve: pip install 'kiln[ray]'") from err


def autoscaling_config(
    min_replicas: int | None = None, max_replicas: int | None = None, target_ongoing_requests: float | None = None
) -> dict[str, Any] | None:
    """Ray's autoscaling config from the CLI's flags; None when none is given (a fixed replica count)."""
    given = {
        key: value
        for key, value in (
            ("min_replicas", min_replicas),
            ("max_replicas", max_replicas),
            ("target_ongoing_requests", target_ongoing_requests),
        )
        if value is not None
    }
    return given or None


def build_app(
    model: str | Path,
    *,
    num_replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    tensor_parallel_size: int = 1,
    num_gpus: float | None = None,
    served_model_name: str | None = None,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    stall_timeout: float = 60.0,
    open_metrics: bool = False,
    allowed_hosts: frozenset[str] | None = None,
    **options: Any,
) -> Any:
    """The Ray Serve application: `num_replicas` kiln engines of `model` (or Ray's autoscaling between
    `autoscaling["min_replicas"]` and `["max_replicas"]`), each serving kiln's OpenAI routes. `options` are
    `kiln.LLM`'s (compile and engine options). num_gpus per replica: None picks tensor_parallel_size when the
    Ray cluster has GPUs and the device asked for is not the CPU, else 0."""
    import ray

    serve = _serve()
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas: {num_replicas!r} is not a positive integer")
    if autoscaling is not None:
        unknown = sorted(set(autoscaling) - AUTOSCALING_KEYS)
        if unknown:
            raise ValueError(
                f"autoscaling: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(AUTOSCALING_KEYS))}"
            )
    path, name = str(model), served_model_name or Path(model).name
    if num_gpus is None:
        on_gpus = str(options.get("device", "auto")) != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        num_gpus = float(tensor_parallel_size) if on_gpus else 0.0

    def make_app() -> Any:  # runs in each replica: the replica loads its own engine
        from .async_engine import AsyncLLMEngine
        from .server import build_app as server_app

        engine = AsyncLLMEngine.from_model(path, stall_timeout, tensor_parallel_size=tensor_parallel_size, **options)
        app = server_app(engine, name, api_key, limits, open_metrics=open_metrics, allowed_hosts=allowed_hosts)
        app.state.kiln_engine = engine
        return app

    class KilnReplica:
        """One engine; Ray calls check_health periodically and replaces the replica when it raises."""

        app: Any  # set by Ray Serve's ingress wrapper: the app make_app built in this replica

        def check_health(self) -> None:
            self.app.state.kiln_engine.engine.check_health()

    scaling: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": num_replicas}
    deployment = serve.deployment(
        serve.ingress(make_app)(KilnReplica),
        name="kiln",
        ray_actor_options={"num_gpus": num_gpus},
        health_check_period_s=5,
        **scaling,
    )
    return deployment.bind()


def run(app: Any, host: str, port: int, blocking: bool = True) -> None:
    """Serve `app` on host:port through Ray Serve's HTTP proxy (a Ray cluster must be up: `ray.init()`)."""
    serve = _serve()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="kiln", route_prefix="/", blocking=blocking)


def serve_forever(
    model: str | Path,
    host: str,
    port: int,
    num_replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    *,
    served_model_name: str | None = None,
    allowed_hosts: list[str] | None = None,
    **options: Any,
) -> None:
    """`kiln serve --ray`: start a local Ray cluster (or join the one RAY_ADDRESS names), serve the replicas on
    host:port until interrupted, then shut Serve and this process's Ray down."""
    import os
    import signal

    import ray

    from .server import host_allowlist

    serve = _serve()
    if not os.environ.get("RAY_ADDRESS"):  # a cluster of our own: its proxy answers errors in OpenAI's shape
        os.environ.update(PROXY_ENV)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    # Ctrl-C (even when started with SIGINT ignored, as a shell's background job is) and a supervisor's SIGTERM
    # both end the loop below, so that Serve and the Ray processes this call started are shut down.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        app = build_app(
            model,
            num_replicas=num_replicas,
            autoscaling=autoscaling,
            served_model_name=served_model_name,
            allowed_hosts=host_allowlist(host, allowed_hosts),
            **options,
        )
        run(app, host, port, blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
