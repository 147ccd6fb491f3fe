"""Which device to run on when the user does not say."""

from __future__ import annotations

import ctypes
import os
import sys

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


MMAP_THRESHOLD = 32 << 20  # glibc's largest
TRIM_THRESHOLD = 256 << 20


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to 32 MB for reuse instead of returning them to the system.

    By default glibc serves large blocks with fresh mmaps below a threshold it raises as the process runs, so the
    same forward pass may find its activations in reused memory or page-fault them in anew, depending on history:
    measured on "small" bf16 (AMX Xeon, 2 threads), 64 requests served in-process took prefill passes of 0.75 s or
    0.57 s, and the whole burst 466-482 against 503-529 tok/s with this set. The price is up to 256 MB of freed
    memory kept (TRIM_THRESHOLD). Process-wide, so the CLI calls it for the commands that run a model
    (cli.RUNS_A_MODEL), not importing glmtorch; a no-op off glibc or with GLMTORCH_MALLOC_TUNING=0. Returns
    whether it was set."""
    if not sys.platform.startswith("linux") or os.environ.get("GLMTORCH_MALLOC_TUNING", "") in ("0", "false", "no"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, or no libc by that name
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))
