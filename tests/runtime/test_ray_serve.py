"""kiln on Ray Serve: two replicas of a tiny model behind kiln's OpenAI routes, on a local Ray cluster started
here. Concurrent requests, streamed and not, all succeed; a replica killed under load is replaced by Ray while
the other keeps answering."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra kiln[ray]")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from kiln.models.testing import cached_checkpoint  # noqa: E402
from kiln.runtime import ray_proxy, ray_serve  # noqa: E402


class ReplicaFailed(Exception):
    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replicas() -> dict[str, int]:
    return dict(serve.status().applications["kiln"].deployments["kiln"].replica_states)


@pytest.fixture(scope="module")
def server():
    """A local Ray cluster serving 2 replicas; everything is torn down after the module."""
    saved = {key: os.environ.get(key) for key in ray_proxy.PROXY_ENV}
    os.environ.update(ray_proxy.PROXY_ENV)  # as `kiln serve --ray` does: the proxy answers in OpenAI's error shape
    context = ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    session = context.address_info["session_dir"]  # this cluster's processes name it on their command lines
    try:
        model = cached_checkpoint("llama")
        port = _free_port()
        ray_serve.run(ray_serve.build_app(model, num_replicas=2, device="cpu"), "127.0.0.1", port, blocking=False)
        yield f"http://127.0.0.1:{port}", model.name
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    deadline = time.monotonic() + 30  # the cluster this module started leaves no process behind
    while _processes(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes(session) == []


def _processes(session: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", session], capture_output=True, text=True).stdout.split()


async def _one(client: httpx.AsyncClient, base: str, model: str, i: int) -> None:
    """One request of four kinds (completion / chat, streamed or not) that must succeed whole."""
    chat, stream = i % 2 == 1, i % 4 >= 2
    route = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict = {"model": model, "max_tokens": 6, "temperature": 0, "stream": stream}
    body.update({"messages": [{"role": "user", "content": f"hi {i}"}]} if chat else {"prompt": f"hello {i}"})
    if not stream:
        r = await client.post(base + route, json=body)
        if r.status_code >= 500:
            is_json = r.headers.get("content-type", "").startswith("application/json")
            raise ReplicaFailed(r.status_code, r.json() if is_json else {"text": r.text})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        return
    async with client.stream("POST", base + route, json=body) as r:
        assert r.status_code == 200
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 2
    assert all("choices" in json.loads(e) for e in events[:-1])


async def _burst(base: str, model: str, n: int) -> list[BaseException | None]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(_one(client, base, model, i) for i in range(n)), return_exceptions=True)


def test_two_replicas_answer_fifty_concurrent_requests(server):
    base, model = server
    assert _replicas() == {"RUNNING": 2}
    results = asyncio.run(_burst(base, model, 50))
    assert [r for r in results if r is not None] == []
    health = httpx.get(base + "/health", timeout=10)
    assert health.status_code == 200


def test_a_killed_replica_is_replaced_and_the_server_keeps_answering(server):
    base, model = server
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA::kiln" in a["name"]]
    assert len(names) == 2
    victim = ray.get_actor(names[0], namespace="serve")

    async def load_and_kill() -> list[BaseException | None]:
        burst = asyncio.create_task(_burst(base, model, 20))
        await asyncio.sleep(0.2)
        ray.kill(victim, no_restart=True)
        return await burst

    results = asyncio.run(load_and_kill())
    # A request that was on the killed replica fails at once, never hangs: a 5xx in OpenAI's error shape, or a
    # stream cut before its end; the rest succeed.
    assert sum(r is None for r in results) >= len(results) // 2
    for failure in (r for r in results if r is not None):
        if isinstance(failure, ReplicaFailed):  # OpenAI's shape from the proxy's middleware, or (some of the time,
            # when the proxy's uvicorn answers before it) its bare 500
            body = failure.body
            assert body.get("text") == "Internal Server Error" or body["error"]["type"] == "server_error", body
        else:
            assert isinstance(failure, (httpx.TransportError, AssertionError)), repr(failure)
    # The survivor answers while Ray brings a new replica up.
    assert [r for r in asyncio.run(_burst(base, model, 6)) if r is not None] == []
    deadline = time.monotonic() + 120
    while True:
        names_now = {
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA::kiln" in a["name"]
        }
        if _replicas() == {"RUNNING": 2} and names_now - set(names):  # a new replica, up and running
            break
        assert time.monotonic() < deadline, f"replica not replaced: {_replicas()}"
        time.sleep(1)
    assert [r for r in asyncio.run(_burst(base, model, 10)) if r is not None] == []


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="num_replicas"):
        ray_serve.build_app("model", num_replicas=0)
    with pytest.raises(ValueError, match="autoscaling"):
        ray_serve.build_app("model", autoscaling={"min_replica": 1})


def test_replica_flags_need_ray(capsys):
    from kiln.__main__ import main

    assert main(["serve", str(cached_checkpoint("llama")), "--num-replicas", "2"]) == 2
    assert "--num-replicas needs --ray" in capsys.readouterr().err
