"""LLMEngine / LLM over the fake paged model: preemption, prefix caching, n > 1, aborts, bad requests."""

from __future__ import annotations

import random

import pytest
from runtime_fakes import CharTokenizer, FakeModel, check_invariants, reference_greedy

from kiln.runtime.engine import LLMEngine
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap")  # every test with async scheduling off and on

VOCAB = 64
GREEDY = dict(temperature=0.0, ignore_eos=True)


def random_prompts(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


def test_64_requests_under_preemption_match_an_unconstrained_run() -> None:
    rng = random.Random(1)
    prompts = random_prompts(64, 1, 60)
    params = [SamplingParams(max_tokens=rng.randint(1, 24), **GREEDY) for _ in prompts]
    roomy = LLM(FakeModel(VOCAB), num_kv_blocks=4096, block_size=4)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    tight = LLM(FakeModel(VOCAB), num_kv_blocks=24, block_size=4, max_num_batched_tokens=48, max_num_seqs=16)
    outs = tight.generate(prompts, params)
    stats = tight.stats()
    assert stats["preemptions"] > 0, "the pool was meant to be small enough to force preemption"
    assert [o.outputs[0].token_ids for o in outs] == expected
    for prompt, sp, got in zip(prompts, params, expected):
        assert got == reference_greedy(prompt, sp.max_tokens, VOCAB)
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert stats["kv_blocks_in_use"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
    check_invariants(tight.engine)


def test_prefix_cache_serves_a_shared_200_token_prefix() -> None:
    prefix = random_prompts(1, 200, 200, seed=7)[0]
    first, second = prefix + [1, 2, 3], prefix + [4, 5, 6, 7]
    model = FakeModel(VOCAB)
    llm = LLM(model, num_kv_blocks=256, block_size=16)
    sp = SamplingParams(max_tokens=8, **GREEDY)
    llm.generate(first, sp)
    hits_before, computed_before = llm.stats()["prefix_cache_hit_tokens"], model.num_forward_tokens
    out = llm.generate(second, sp)[0]
    hit = llm.stats()["prefix_cache_hit_tokens"] - hits_before
    assert hit == (200 // 16) * 16
    assert out.num_cached_tokens == hit
    # Only the suffix (plus the partial block) was prefilled, then one token per decode step.
    assert model.num_forward_tokens - computed_before == len(second) - hit + 7
    assert out.outputs[0].token_ids == reference_greedy(second, 8, VOCAB)
    no_cache = LLM(FakeModel(VOCAB), num_kv_blocks=256, block_size=16, enable_prefix_caching=False)
    assert no_cache.generate(second, sp)[0].outputs[0].token_ids == out.outputs[0].token_ids
    assert no_cache.stats()["prefix_cache_hit_tokens"] == 0


def record_schedules(engine: LLMEngine) -> list:
    """Wrap the scheduler so that a test can inspect every step's decisions."""
    seen = []
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        seen.append([(seq.request.request_id, n) for seq, n in zip(out.seqs, out.num_new_tokens)])
        return out

    engine.scheduler.schedule = recording
    return seen


def test_chunked_prefill_splits_long_prompts_and_decodes_keep_running() -> None:
    engine = LLMEngine(FakeModel(VOCAB), num_kv_blocks=128, block_size=4, max_num_batched_tokens=16)
    steps = record_schedules(engine)
    engine.add_request("short", [5, 6, 7], SamplingParams(max_tokens=30, **GREEDY))
    engine.step()  # short's prefill; it decodes from now on
    long_prompt = random_prompts(1, 100, 100)[0]
    engine.add_request("long", long_prompt, SamplingParams(max_tokens=2, **GREEDY))
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
        check_invariants(engine)
    long_steps = [dict(step) for step in steps if "long" in dict(step)]
    assert len(long_steps) >= 100 // 16 + 1, "the long prompt should be split into chunks"
    for step in steps:
        assert sum(n for _, n in step) <= 16
    for step in long_steps:
        assert step.get("short") == 1, "the running decode stalled behind the prefill"
    assert outputs["short"].outputs[0].token_ids == reference_greedy([5, 6, 7], 30, VOCAB)
    assert outputs["long"].outputs[0].token_ids == reference_greedy(long_prompt, 2, VOCAB)


def test_chunked_prefill_off_runs_whole_prompts() -> None:
    prompts = random_prompts(8, 1, 40, seed=3)
    llm = LLM(FakeModel(VOCAB, max_model_len=128), num_kv_blocks=64, block_size=4, enable_chunked_prefill=False)
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(p, 5, VOCAB) for p in prompts]
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(FakeModel(VOCAB, max_model_len=128), enable_chunked_prefill=False, max_num_batched_tokens=64)


def test_n_greater_than_one_shares_the_prompt_blocks() -> None:
    model = FakeModel(VOCAB)
    llm = LLM(model, num_kv_blocks=64, block_size=4, enable_prefix_caching=False)
    prompt = random_prompts(1, 41, 41)[0]
    out = llm.generate(prompt, SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "siblings should sample independently"
    # The prompt was prefilled once; each sibling recomputed at most its last partial block.
    assert model.num_forward_tokens <= 41 + 3 * (41 % 4 + 4) + 4 * 5
    assert llm.stats()["kv_blocks_in_use"] == 0


def test_abort_frees_everything_and_others_continue() -> None:
    engine = LLMEngine(FakeModel(VOCAB), num_kv_blocks=64, block_size=4)
    for i, prompt in enumerate(random_prompts(6, 5, 30)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=10, **GREEDY))
    engine.step()
    engine.step()
    engine.abort(["r1", "r4"])
    engine.abort("missing")  # unknown ids are ignored
    check_invariants(engine)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        check_invariants(engine)
    assert set(finished) == {"r0", "r2", "r3", "r5"}
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_bad_requests_raise_at_add_and_leave_others_running() -> None:
    engine = LLMEngine(FakeModel(VOCAB, max_model_len=64), num_kv_blocks=8, block_size=4)
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=8, **GREEDY))
    engine.step()
    bad = [
        (dict(prompt="text"), "tokenizer"),
        (dict(prompt=[]), "empty"),
        (dict(prompt=[1, VOCAB]), "token ids"),
        (dict(prompt=[1, 2], params=SamplingParams(max_tokens=63)), "max_model_len"),
        (dict(prompt=[1] * 20, params=SamplingParams(max_tokens=20)), "KV blocks"),
        (dict(prompt=[1], params={"temperature": -1}), "temperature"),
        (dict(prompt=[1], params={"bogus": 1}), "bogus"),
        (dict(prompt=[1], params=SamplingParams(stop="x")), "stop"),
        (dict(prompt=[1], request_id="ok"), "already in use"),
        (dict(prompt=3), "prompt"),
    ]
    for kwargs, message in bad:
        kwargs = {"request_id": "bad", "params": None, **kwargs}
        with pytest.raises(ValueError, match=message):
            engine.add_request(kwargs["request_id"], kwargs["prompt"], kwargs["params"])
    check_invariants(engine)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == "ok" and outs[-1].finished
    assert outs[-1].outputs[0].token_ids == reference_greedy([1, 2, 3], 8, VOCAB)
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_llm_generate_validates_the_whole_batch_first() -> None:
    llm = LLM(FakeModel(VOCAB), num_kv_blocks=32, block_size=4)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[1, 2], [3, 4]], [SamplingParams(max_tokens=2), {"max_tokens": 0}])
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([[1, 2], [3, 4]], [SamplingParams()])
    assert llm.stats()["num_waiting"] == 0 and not llm.engine.has_unfinished_requests()


def test_outputs_are_in_input_order_with_metrics() -> None:
    prompts = random_prompts(10, 1, 50, seed=5)
    lengths = [12 - i for i in range(10)]
    llm = LLM(FakeModel(VOCAB), num_kv_blocks=128, block_size=8, max_num_seqs=3)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, **GREEDY) for n in lengths], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    assert [o.prompt_token_ids for o in outs] == prompts
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_eos_and_stop_token_ids_and_min_tokens() -> None:
    prompt = [9, 8, 7]
    free_run = reference_greedy(prompt, 12, VOCAB)
    eos = free_run[4]
    first_eos = free_run.index(eos)
    llm = LLM(FakeModel(VOCAB, eos_token_ids=[eos]), num_kv_blocks=64, block_size=4)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert out.token_ids == free_run[: first_eos + 1] and out.finish_reason == "stop" and out.stop_reason is None
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == free_run and out.finish_reason == "length"
    stop_tok = free_run[2]
    out = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok], ignore_eos=True)
    )[0].outputs[0]
    assert out.token_ids == free_run[: free_run.index(stop_tok) + 1] and out.stop_reason == stop_tok
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, min_tokens=8))[0].outputs[0]
    assert len(out.token_ids) >= 8 and eos not in out.token_ids[:8]


def test_text_prompts_and_incremental_text() -> None:
    tok = CharTokenizer()
    llm = LLM(FakeModel(tok.vocab_size, tokenizer=tok), num_kv_blocks=64, block_size=4)
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out.prompt == "the cat" and out.prompt_token_ids == tok.encode("the cat")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)


@pytest.mark.parametrize(
    "option,value",
    [
        ("block_size", 0),
        ("max_num_seqs", 0),
        ("num_kv_blocks", 0),
        ("kv_cache_memory", 10),
        ("max_num_batched_tokens", 0),
    ],
)
def test_bad_engine_options_name_themselves(option: str, value: int) -> None:
    with pytest.raises(ValueError, match=option):
        LLM(FakeModel(VOCAB), **{option: value})


def test_kv_pool_sizing() -> None:
    model = FakeModel(VOCAB, max_model_len=100)
    per_block = model.kv_cache_bytes_per_block(8)
    assert LLM(model, block_size=8, kv_cache_memory=per_block * 37 + 5).stats()["kv_blocks_total"] == 37
    assert LLM(model, block_size=8, num_kv_blocks=11).stats()["kv_blocks_total"] == 11
    # Default: room for max_num_seqs sequences of max_model_len tokens.
    assert LLM(model, block_size=8, max_num_seqs=4).stats()["kv_blocks_total"] == -(-4 * 100 // 8)


def test_a_request_with_many_sequences_does_not_starve_a_later_one() -> None:
    """Fairness: B's only sequence (rank 0) is admitted before A's second to eighth (ranks 1-7)."""
    engine = LLMEngine(FakeModel(VOCAB), num_kv_blocks=128, block_size=4, max_num_seqs=4)
    engine.add_request("A", [1, 2, 3], SamplingParams(n=8, max_tokens=20, **GREEDY))
    engine.step()  # A's first sequence computes the shared prompt; its siblings wait for it
    engine.add_request("B", [4, 5], SamplingParams(max_tokens=2, **GREEDY))
    first_token_step, finished, steps = None, {}, 0
    while engine.has_unfinished_requests():
        steps += 1
        for out in engine.step():
            if out.request_id == "B" and first_token_step is None and out.outputs[0].token_ids:
                first_token_step = steps
            if out.finished:
                finished[out.request_id] = out
    assert finished["B"].outputs[0].token_ids == reference_greedy([4, 5], 2, VOCAB)
    assert finished["A"].outputs[0].token_ids == reference_greedy([1, 2, 3], 20, VOCAB)
    assert first_token_step is not None and first_token_step <= 3, "B waited behind A's siblings"
    assert engine.stats()["kv_blocks_in_use"] == 0


def test_cache_salt_keeps_tenants_prefix_caches_apart() -> None:
    llm = LLM(FakeModel(VOCAB), num_kv_blocks=128, block_size=4)
    engine, prompt = llm.engine, random_prompts(1, 40, 40)[0]

    def hits(rid: str, salt: str | None) -> int:
        before = engine.stats()["prefix_cache_hit_tokens"]
        engine.enqueue(engine.make_request(rid, prompt, SamplingParams(max_tokens=2, **GREEDY), cache_salt=salt))
        while engine.has_unfinished_requests():
            engine.step()
        return engine.stats()["prefix_cache_hit_tokens"] - before

    assert hits("a1", "tenant-a") == 0
    assert hits("b1", "tenant-b") == 0, "another tenant's prompt must not hit"
    assert hits("n1", None) == 0
    assert hits("a2", "tenant-a") == 36 and hits("n2", None) == 36  # full blocks of the same tenant's prompt
    with pytest.raises(ValueError, match="cache_salt"):
        engine.make_request("bad", prompt, None, cache_salt="")
