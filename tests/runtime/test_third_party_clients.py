"""Third-party clients against `kiln serve` on loopback: lm-evaluation-harness (a loglikelihood multiple_choice
task and a generate_until one, through `local-completions` with the remote tokenizer: /tokenizer_info,
/tokenize, /detokenize; tasks and data written by the test, --limit 5) and LiteLLM's JSON mode. (The openai SDK
and LangChain have their own files.)"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from test_server import LiveServer

from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.server import build_app

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test extra (`make test` installs it)")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: LiteLLM's bundled price map
litellm = pytest.importorskip("litellm", reason="litellm is a test extra (`make test` installs it)")

MODEL = "tiny-llama"
TASKS = {
    "kiln_choice": """task: kiln_choice
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "kiln_generate": """task: kiln_generate
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def live(checkpoint):
    engine = AsyncLLMEngine.from_model(str(checkpoint("llama")), num_kv_blocks=256, block_size=16)
    server = LiveServer(build_app(engine, MODEL, None), engine)
    yield server
    server.stop()


def test_lm_eval_loglikelihood_and_generate_until_run_against_kiln(live, tmp_path: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    rows = [
        {"question": f"Question {i}: which colour is the kiln?", "choices": ["red", "blue", "grey"], "answer": i % 3}
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, template in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(template.format(data=data))
    results = simple_evaluate(
        model="local-completions",
        model_args={
            "model": MODEL,
            "base_url": f"{live.url}/v1/completions",
            "tokenizer_backend": "remote",
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tmp_path)),
        limit=5,
    )
    assert results is not None
    choice, generate = results["results"]["kiln_choice"], results["results"]["kiln_generate"]
    assert 0.0 <= choice["acc,none"] <= 1.0 and not math.isnan(choice["acc,none"])
    assert 0.0 <= generate["exact_match,none"] <= 1.0
    assert results["n-samples"]["kiln_choice"]["effective"] == 5


def test_litellm_json_mode_returns_schema_valid_json(live) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "rank": {"type": "integer", "minimum": 1, "maximum": 99},
        },
        "required": ["city", "rank"],
    }
    common = {"model": f"openai/{MODEL}", "api_base": f"{live.url}/v1", "api_key": "none", "temperature": 0}
    messages = [{"role": "user", "content": "A city and its rank, as JSON."}]
    response = litellm.completion(
        **common,
        messages=messages,
        max_tokens=96,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), schema)
    loose = litellm.completion(**common, messages=messages, max_tokens=8, response_format={"type": "json_object"})
    assert loose.choices[0].message.content.startswith("{")  # the random model never closes a free object
