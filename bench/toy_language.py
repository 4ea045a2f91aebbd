"""A briefly trained checkpoint for accuracy benchmarks, since no trained model can be downloaded here.

Random weights make a poor subject for quantization accuracy: their next-token distribution is nearly uniform
(over 32,000 tokens the top-1 logit leads the second by a few hundredths), so any error flips the argmax. A
trained model is confident where it has learned something. This trains the benchmark's model for a few minutes
on a toy language, a Markov chain over 64 tokens in which each token has one likely successor (p = 0.7) and
seven less likely ones, until its predictions have the margins of a trained model. The result is cached under
kiln's cache directory, keyed by everything that shapes it, so later runs load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import transformers

from kiln.models.testing import build_tiny_checkpoint

SUCCESSOR_PROBS = [0.7, 0.15, 0.06, 0.04, 0.02, 0.01, 0.01, 0.01]


class MarkovLanguage:
    """`size` tokens drawn from the vocabulary; each one's successors follow SUCCESSOR_PROBS."""

    def __init__(self, vocab_size: int, size: int = 64, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randperm(vocab_size, generator=self.gen)[:size]
        successors = torch.stack(
            [torch.randperm(size, generator=self.gen)[: len(SUCCESSOR_PROBS)] for _ in range(size)]
        )
        self.probs = torch.zeros(size, size).scatter_(1, successors, torch.tensor(SUCCESSOR_PROBS).expand(size, -1))

    def sample(self, batch: int, length: int) -> torch.Tensor:
        """[batch, length] token ids, each row a walk of the chain from a uniform start."""
        walk = torch.empty(batch, length, dtype=torch.long)
        walk[:, 0] = torch.randint(len(self.tokens), (batch,), generator=self.gen)
        for t in range(1, length):
            walk[:, t] = torch.multinomial(self.probs[walk[:, t - 1]], 1, generator=self.gen).squeeze(1)
        return self.tokens[walk]


def trained_checkpoint(shape: dict, steps: int = 120, batch: int = 16, length: int = 32, lr: float = 3e-3) -> Path:
    """A Llama of `shape` trained `steps` AdamW steps on MarkovLanguage (seed 0); built once, then cached."""
    recipe = dict(
        shape=shape,
        steps=steps,
        batch=batch,
        length=length,
        lr=lr,
        probs=SUCCESSOR_PROBS,
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = (
        Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln") / "bench" / f"llama-markov-{digest}"
    )
    if (root / "config.json").exists():
        return root
    scratch = root.with_name(root.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)  # left by an interrupted run
    torch.manual_seed(0)
    path = build_tiny_checkpoint("llama", scratch, with_tokenizer=False, **shape)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    language = MarkovLanguage(shape["vocab_size"])
    # Embeddings and head learn the successor table; a 3x rate gets them there in a hundred steps.
    fast = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    rest = [p for p in model.parameters() if all(p is not f for f in fast)]
    optimizer = torch.optim.AdamW([{"params": fast, "lr": 3 * lr}, {"params": rest, "lr": lr}], weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    for step in range(steps):
        ids = language.sample(batch, length)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == steps - 1:
            print(
                f"training on the toy language: step {step}, loss {loss.item():.3f}, "
                f"{time.perf_counter() - start:.0f}s",
                flush=True,
            )
    torch.set_num_threads(threads)
    model.save_pretrained(path)
    os.replace(path, root)
    return root


def prompt(vocab_size: int, length: int, seed: int = 1) -> list[int]:
    """A walk of the toy language (a fresh generator, so it does not depend on training having run)."""
    language = MarkovLanguage(vocab_size)
    language.gen.manual_seed(seed)
    return language.sample(1, length)[0].tolist()
