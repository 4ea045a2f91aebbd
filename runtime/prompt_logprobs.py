"""Prompt logprobs (vLLM's `prompt_logprobs`, OpenAI's `echo` with `logprobs`): what scoring clients such as
lm-evaluation-harness's loglikelihood tasks read. They come from the prefill itself: the scheduler asks for logits
at every position of a scored prompt chunk (`SchedulerOutput.scored`), and the logits at position p score prompt
token p + 1. Computed right after the forward and copied to the host at once, since scoring requests are few and
want every number."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .scheduler import SchedulerOutput


def score_prompts(logits: torch.Tensor, out: SchedulerOutput) -> None:
    """Fill each scored request's `prompt_logprobs` for the positions this step's chunk covers. `logits` holds
    out.num_logits.get(i, 1) consecutive rows per sequence, in packing order."""
    first, end = [], 0
    for i in range(len(out.seqs)):
        first.append(end)
        end += out.num_logits.get(i, 1)
    for pos, context in out.scored.items():
        seq = out.seqs[pos]
        request = seq.request
        assert request.prompt_logprobs is not None
        count = min(out.num_logits[pos], seq.num_prompt_tokens - 1 - context)  # the last scores the first output
        if count <= 0:
            continue
        x = logits[first[pos] : first[pos] + count].float().log_softmax(-1)
        targets = torch.tensor(seq.token_ids[context + 1 : context + 1 + count], device=x.device)
        chosen = x.gather(1, targets[:, None])[:, 0].tolist()
        k = request.params.prompt_logprobs or 0
        top_values, top_ids = x.topk(k, dim=-1) if k else (x[:, :0], x[:, :0].long())
        for j, (token, value, values, ids) in enumerate(
            zip(targets.tolist(), chosen, top_values.tolist(), top_ids.tolist(), strict=True)
        ):
            entry = dict(zip(ids, values, strict=True))
            entry[token] = value
            request.prompt_logprobs[context + 1 + j] = entry
