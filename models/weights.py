"""Build an HF model on its serving device and fill it from safetensors, tensor by tensor.

transformers' own `from_pretrained(device_map=...)` needs `accelerate`, and without it every weight goes
through CPU memory first. Here the model is built on the device with initialisation skipped (buffers computed in
`__init__`, such as rotary frequencies, are computed there, on the device), then each checkpoint tensor is read
straight onto the device and copied into its parameter: the peak is the model plus one tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# Keys old checkpoints carry that today's models compute instead.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|\.attn\.(masked_)?bias$")


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors shards, [] when it has none."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []


def _empty_model(
    config: PretrainedConfig, dtype: torch.dtype, attn_implementation: str, device: torch.device
) -> PreTrainedModel:
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # skipped with the initialisation; a tied head then shares the embedding's storage
    return model.eval()


def load_safetensors_model(
    path: Path, config: PretrainedConfig, dtype: torch.dtype, attn_implementation: str, device: torch.device
) -> PreTrainedModel | None:
    """The model on `device` with every weight from the checkpoint, or None when the checkpoint's tensor names or
    shapes are not the model's own (a legacy layout that transformers renames or converts on loading: the
    caller then loads through transformers). Checked before anything is read."""
    from safetensors import safe_open

    files = safetensors_files(path)
    model = _empty_model(config, dtype, attn_implementation, device)
    targets = model.state_dict(keep_vars=True)
    plan: list[tuple[Path, str, torch.Tensor]] = []
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            for key in shard.keys():
                if _IGNORED.search(key) and key not in targets:
                    continue
                target = targets.get(key)
                if target is None or list(shard.get_slice(key).get_shape()) != list(target.shape):
                    return None
                plan.append((file, key, target))
    covered = {target.data_ptr() for _, _, target in plan}
    if any(t.data_ptr() not in covered for t in targets.values()):
        return None
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt", device=str(device)) as shard:
                for _, key, target in (entry for entry in plan if entry[0] == file):
                    target.copy_(shard.get_tensor(key))
    return model
