"""`python -m glmtorch ...` (and `torchrun --nproc-per-node N -m glmtorch ...` for tensor parallelism)."""

import sys

from .cli import main

sys.exit(main())
