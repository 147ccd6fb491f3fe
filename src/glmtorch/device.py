"""Which device to run on when the user does not say."""

from __future__ import annotations

import os

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


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on `device` (None where it cannot be known): free GPU memory, or on a
    CPU the kernel's MemAvailable (memory that can be had without swapping)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_allocation(nbytes: int, device: torch.device | str, what: str, advice: str) -> None:
    """Refuse, with a message saying what to change, an allocation that cannot fit: torch would fail deep inside,
    or on a CPU succeed on paper and then grow until the machine swaps."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise MemoryError(f"{what} needs {nbytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free on "
                          f"{device}; {advice}")
