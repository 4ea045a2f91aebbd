"""The server with n-gram speculation: completions equal the engine's without it, and /metrics counts the
proposed and accepted tokens."""

from __future__ import annotations

from test_server import KEY, LiveServer

from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server import build_app


def test_server_completions_and_metrics_with_speculation(checkpoint) -> None:
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    engine = AsyncLLMEngine.from_model(str(checkpoint("llama")), num_kv_blocks=64, speculative_config=spec)
    live = LiveServer(build_app(engine, "tiny", KEY), engine)
    try:
        prompt = "the kiln, the kiln, the kiln, the kiln"
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
        res = live.http.post("/v1/completions", json=body)
        assert res.status_code == 200, res.text
        plain = LLM(engine.engine.model, num_kv_blocks=64)
        expected = plain.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
        assert res.json()["choices"][0]["text"] == expected.outputs[0].text
        proposed = live.metric("kiln_spec_decode_num_draft_tokens_total")
        assert proposed > 0 and 0 <= live.metric("kiln_spec_decode_num_accepted_tokens_total") <= proposed
        assert live.metric("kiln_spec_decode_mean_accepted_length") >= 1
    finally:
        live.stop()
