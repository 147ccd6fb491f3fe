"""Which device to run on when the user does not say."""

from __future__ import annotations

import torch


def infer_device() -> str:
    """'cuda' when a CUDA (or ROCm) GPU is visible, then 'xpu', then 'mps', else 'cpu'."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"
