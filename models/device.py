"""Where a model serves from: the one place that turns a `device` argument into a `torch.device`."""

from __future__ import annotations

import torch

DeviceLike = str | torch.device | None


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """ "auto" (or None) is the first CUDA GPU when one is present, else the CPU; "cpu", "cuda" and "cuda:N" as
    torch spells them. A GPU that is asked for but absent is a ValueError naming `device`, not a CUDA error
    later in the first forward."""
    if device is None or device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise ValueError(f"device: {device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device: {device!r} was asked for, but no CUDA GPU is available here "
            f"(torch {torch.__version__}); use device='cpu' or 'auto'"
        )
    index = resolved.index if resolved.index is not None else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)
