"""The CPU a figure was measured on (lscpu's model name and the flags that decide the matrix paths), without
importing torch: every benchmark report carries it, `glmtorch bench-serve` included."""

from __future__ import annotations

import os
import platform

MATRIX_FLAGS = ("fma", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                "amx_int8")


def cpu_description() -> dict:
    """The CPU a figure was measured on: lscpu's model name and the flags that decide the matrix paths."""
    model, flags = cpu_model_and_flags()
    return {"model": model, "flags": [f for f in MATRIX_FLAGS if f in flags], "cores": os.cpu_count()}


def cpu_model_and_flags(path: str = "/proc/cpuinfo") -> tuple[str, list[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo (an ARM CPU's "Features"); platform's names where there
    is none."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    return model, flags
