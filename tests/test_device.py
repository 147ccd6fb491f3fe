"""glmtorch.device: the allocator setting the CLI makes for the commands that run a model."""

import subprocess
import sys

import pytest

PROBE = "from glmtorch.device import reuse_freed_memory; print(reuse_freed_memory())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_freed_memory_sets_glibc_and_can_be_turned_off():
    """In a child process: the setting is process-wide. On glibc it is set; GLMTORCH_MALLOC_TUNING=0 leaves it."""
    import os

    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else ""
    on = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.strip()
    off = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "GLMTORCH_MALLOC_TUNING": "0"}).stdout.strip()
    assert on == ("True" if (libc or "").startswith("glibc") else "False")
    assert off == "False"
