"""Tiny random-weight Hugging Face checkpoints for tests and the demo.

No weights are ever downloaded: each checkpoint is built the real way (config -> model ->
`save_pretrained`), with a byte-level BPE tokenizer trained on the spot on a small embedded
corpus, so the compiler is always fed a directory exactly like one from the hub.

Special token ids are fixed across every architecture: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# Shared shape: hidden 64, 2 layers, 4 heads of 16, 2 KV heads where the arch has GQA.
# initializer_range is raised from the usual 0.02 so that random logits have clear argmax
# margins; otherwise greedy comparisons between engines hinge on float noise.
_COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,
}
_NO_GQA = {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}

# name -> (HF model_type, config kwargs). Names other than model types are variants.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {**_COMMON, "head_dim": 16}),
    "mistral": ("mistral", {**_COMMON, "head_dim": 16, "sliding_window": 16}),
    "qwen2": ("qwen2", dict(_COMMON)),
    # Layer 0 full attention, layer 1 sliding (window 16), via Qwen2's layer_types.
    "qwen2_swa": ("qwen2", {**_COMMON, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
    "phi3": ("phi3", {**_COMMON, "original_max_position_embeddings": 512}),
    "gemma": ("gemma", {**_COMMON, "head_dim": 16}),
    "gpt2": (
        "gpt2",
        {
            "vocab_size": 512,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 512,
            "n_inner": 128,
            "initializer_range": 0.1,
        },
    ),
    "gpt_neox": ("gpt_neox", dict(_NO_GQA)),  # partial rotary (25%), parallel residual
    "phi": ("phi", dict(_COMMON)),  # partial rotary (50%), parallel attn/MLP, biases
    "qwen3": ("qwen3", {**_COMMON, "head_dim": 16}),  # q/k RMSNorm
    # Small softcaps so that they actually bend the random logits; window 16 on even layers.
    "gemma2": (
        "gemma2",
        {
            **_COMMON,
            "head_dim": 16,
            "sliding_window": 16,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "starcoder2": ("starcoder2", dict(_COMMON)),  # LayerNorm, biases, GELU MLP
    "olmo": ("olmo", dict(_COMMON)),  # non-parametric LayerNorm
    "olmo2": ("olmo2", dict(_COMMON)),  # post-norms, q/k RMSNorm over all heads
    "stablelm": ("stablelm", dict(_COMMON)),  # partial rotary, LayerNorm
    # Non-default multipliers so that each scaling site is exercised.
    "granite": (
        "granite",
        {
            **_COMMON,
            "embedding_multiplier": 4.0,
            "logits_scaling": 2.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.125,
        },
    ),
}

# The `make demo` model: a small Llama, still quick to build and run on a laptop CPU.
DEMO_ARCH = "llama"
DEMO_NAME = "kiln-demo-llama"
DEMO_OVERRIDES: dict[str, Any] = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "intermediate_size": 688,
    "vocab_size": 2048,
    "max_position_embeddings": 2048,
    "initializer_range": 0.05,
}

# Bump when the way checkpoints are built changes, so that cached ones are rebuilt.
BUILDER_VERSION = 2

_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

_CORPUS = """\
The kiln was built at the edge of the village, where the clay from the river bank was soft
and grey. Every morning the potter carried water up the hill, mixed it with the clay, and
worked the wheel until the sun was high. Bowls, cups, jars and plates stood in long rows on
wooden shelves, drying slowly in the shade before they were ready for the fire.

A good firing takes patience. The fire must rise slowly at first, so that the last of the
water can leave the clay without cracking it. Then the heat grows, hour after hour, until
the inside of the kiln glows orange and then almost white. When the fire is finally allowed
to die, the pots cool for a day or two before anyone opens the door to see what happened.

Language models are trained to predict the next word in a sentence. Given the beginning of
a story, a model assigns a probability to every token in its vocabulary and picks one, then
repeats the process with the new token added to the context. Serving such a model quickly
means keeping the keys and values of past tokens in a cache, so that each new step only
computes attention for one position instead of the whole sequence again.

A compiler reads a program, builds a graph of its operations, and rewrites that graph into
a faster form. Some rewrites remove work that is never needed, some fuse small operations
into larger ones, and some replace a general pattern with a specialised kernel. The result
should compute exactly the same answer as the original program, only sooner and with less
memory. Tests compare the two, token by token, to make sure nothing was lost on the way.

Once upon a time there was a small robot who wanted to learn how to paint. It watched the
painters in the market square, copied their brush strokes, and slowly filled its notebook
with trees, boats, clouds, cats, and the faces of the people who stopped to say hello.
What is the capital of France? Paris is the capital of France. How many days are in a
week? There are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday,
Saturday and Sunday. Numbers like 1, 2, 3, 10, 42, 100 and 2048 also appear in text.

The weather changed quickly in the mountains. In the morning the sky was clear and blue,
by noon the clouds had gathered over the peaks, and in the evening a cold rain fell on the
roofs of the houses. The children ran inside, the dogs curled up by the stove, and the old
man at the end of the street lit his lamp and opened a book he had read many times before.
"""


def tiny_config(arch: str, **overrides: Any) -> Any:
    """The tiny `PretrainedConfig` for `arch` (a key of TINY_CONFIGS), with fixed special ids."""
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny arch {arch!r}; known: {', '.join(sorted(TINY_CONFIGS))}")
    model_type, kwargs = TINY_CONFIGS[arch]
    kwargs = {**kwargs, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    config.dtype = "float32"
    return config


def build_tiny_tokenizer(vocab_size: int, model_max_length: int = 512) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` with exactly `vocab_size` entries.

    The embedded corpus cannot supply merges for large vocabularies, so any remainder is filled
    with reserved tokens (as Llama 3 does). They are plain, not special, tokens: a random model
    emits them often, and the demo's text should show them rather than silently drop them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    missing = vocab_size - tok.get_vocab_size()
    if missing < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet plus specials")
    tok.add_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=_CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
    ids = fast.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == [UNK_ID, BOS_ID, EOS_ID, PAD_ID], ids
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def build_tiny_checkpoint(
    arch: str, path: str | os.PathLike[str], *, seed: int = 0, with_tokenizer: bool = True, **config_overrides: Any
) -> Path:
    """Write a random-weight checkpoint of `arch` to `path`; same seed, same bytes of weights."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        max_len = getattr(config, "max_position_embeddings", None) or config.n_positions
        build_tiny_tokenizer(config.vocab_size, max_len).save_pretrained(path)
    return path


def cache_dir() -> Path:
    """Where built checkpoints live: $KILN_CACHE_DIR/models, else ~/.cache/kiln/models."""
    root = os.environ.get("KILN_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "kiln"
    return base / "models"


def cached_checkpoint(arch: str, name: str | None = None, *, seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny checkpoint once and reuse it; rebuilt when the recipe changes.

    The recipe (builder version, arch, seed, overrides, the arch's base config) is stored beside
    the weights, so editing TINY_CONFIGS or the overrides never serves a stale model.
    """
    recipe = {
        "builder": BUILDER_VERSION,
        "arch": arch,
        "seed": seed,
        "base": TINY_CONFIGS[arch],
        "overrides": overrides,
    }
    blob = json.dumps(recipe, sort_keys=True, default=str)
    if name is None:
        name = f"{arch}-tiny-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
    target = cache_dir() / name
    stamp = target / "kiln-recipe.json"
    if stamp.is_file() and stamp.read_text() == blob:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and swap in, so a crash or a concurrent run never leaves a half.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_tiny_checkpoint(arch, tmp, seed=seed, **overrides)
        (tmp / "kiln-recipe.json").write_text(blob)
        shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not (stamp.is_file() and stamp.read_text() == blob):  # lost a race to a twin
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_checkpoint() -> Path:
    """The cached small Llama used by `kiln demo` / `make demo`."""
    return cached_checkpoint(DEMO_ARCH, DEMO_NAME, **DEMO_OVERRIDES)
