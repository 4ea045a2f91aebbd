"""Prometheus text-format metrics for the server, hand-written so that serving needs no extra dependency.

Counters and histograms are updated as requests finish; engine gauges (KV blocks, queue sizes, preemptions)
are read from `LLMEngine.stats()` at scrape time, so they can never drift from the engine's own counts.
"""

from __future__ import annotations

import bisect
from typing import Any

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        running += self.counts[-1]
        lines += [
            f'{self.name}_bucket{{le="+Inf"}} {running}',
            f"{self.name}_sum {self.total}",
            f"{self.name}_count {running}",
        ]
        return lines


class ServerMetrics:
    """The server's counters and latency histograms; `render` adds the engine's live gauges."""

    def __init__(self) -> None:
        self.http_requests: dict[tuple[str, str], int] = {}
        self.finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Time from arrival to the first token.")
        self.tpot = Histogram(
            "kiln_time_per_output_token_seconds", "Mean time per output token after the first, per request."
        )
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "Time from arrival to the last token.")

    def count_http(self, path: str, status: int) -> None:
        key = (path, str(status))
        self.http_requests[key] = self.http_requests.get(key, 0) + 1

    def record_request(self, output: Any) -> None:
        """Account one finished (or aborted) engine request, a RequestOutput."""
        self.prompt_tokens += len(output.prompt_token_ids)
        num_out = max((len(c.token_ids) for c in output.outputs), default=0)
        self.generation_tokens += sum(len(c.token_ids) for c in output.outputs)
        for c in output.outputs:
            reason = c.finish_reason or "abort"
            self.finished[reason] = self.finished.get(reason, 0) + 1
        m = output.metrics
        if m is None or m.first_token_time is None or not output.finished:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
            if num_out > 1:
                self.tpot.observe((m.finished_time - m.first_token_time) / (num_out - 1))

    def render(self, engine_stats: dict[str, int | float]) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{_labels(labels)} {value}" for labels, value in samples)

        s = engine_stats
        family(
            "kiln_http_requests_total",
            "counter",
            "HTTP requests by route and status code.",
            [({"path": p, "status": c}, n) for (p, c), n in sorted(self.http_requests.items())],
        )
        family(
            "kiln_request_finished_total",
            "counter",
            "Finished completions (choices) by finish reason.",
            [({"finished_reason": r}, n) for r, n in sorted(self.finished.items())],
        )
        family("kiln_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [({}, self.prompt_tokens)])
        family(
            "kiln_generation_tokens_total",
            "counter",
            "Generated tokens of finished requests.",
            [({}, self.generation_tokens)],
        )
        for hist in (self.ttft, self.tpot, self.e2e):
            lines.extend(hist.render())
        used, total = s["kv_blocks_in_use"], s["kv_blocks_total"]
        family(
            "kiln_kv_cache_usage_perc",
            "gauge",
            "Fraction of KV cache blocks in use (0 to 1).",
            [({}, used / total if total else 0.0)],
        )
        family("kiln_kv_blocks_in_use", "gauge", "KV cache blocks held by requests.", [({}, used)])
        family("kiln_kv_blocks_total", "gauge", "KV cache blocks in the pool.", [({}, total)])
        family(
            "kiln_kv_cache_capacity_tokens", "gauge", "Tokens the KV cache pool holds.", [({}, s["kv_cache_tokens"])]
        )
        family(
            "kiln_kv_cache_capacity_bytes",
            "gauge",
            "Bytes of the KV cache pool (all layers, K and V).",
            [({}, s["kv_cache_bytes"])],
        )
        family("kiln_num_requests_running", "gauge", "Sequences in the running batch.", [({}, s["num_running"])])
        family("kiln_num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", [({}, s["num_waiting"])])
        family(
            "kiln_num_unfinished_requests",
            "gauge",
            "Requests admitted and not yet finished.",
            [({}, s["num_unfinished_requests"])],
        )
        family(
            "kiln_num_preemptions_total", "counter", "Sequences preempted to free KV blocks.", [({}, s["preemptions"])]
        )
        family(
            "kiln_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache.",
            [({}, s["prefix_cache_hit_tokens"])],
        )
        family(
            "kiln_prefix_cache_query_tokens_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            [({}, s["prefix_cache_query_tokens"])],
        )
        if "spec_num_drafts" in s:  # speculative decoding is configured
            for name, kind, help_text, key in _SPEC_FAMILIES:
                family(name, kind, help_text, [({}, s[key])])
        return "\n".join(lines) + "\n"


_SPEC_FAMILIES = (
    ("kiln_spec_decode_num_drafts_total", "counter", "Verifications of proposed tokens.", "spec_num_drafts"),
    ("kiln_spec_decode_num_draft_tokens_total", "counter", "Tokens proposed.", "spec_draft_tokens"),
    ("kiln_spec_decode_num_accepted_tokens_total", "counter", "Proposed tokens accepted.", "spec_accepted_tokens"),
    ("kiln_spec_decode_acceptance_rate", "gauge", "Accepted / proposed tokens so far.", "spec_acceptance_rate"),
    (
        "kiln_spec_decode_mean_accepted_length",
        "gauge",
        "Tokens emitted per verification (accepted proposals + 1).",
        "spec_mean_accepted_length",
    ),
)
