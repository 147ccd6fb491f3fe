"""What makes decoding fast, applied from outside the model.

Decoding one token reads every weight once, so batch-1 decode speed is weight bytes / memory bandwidth. On a
CPU the library matrix-vector paths (oneDNN/MKL behind F.linear) read weights at about half the bandwidth; the
kernels in glmtorch.kernels (built on first use) stream each weight once for up to 8 rows. So:

- `GemvLinear` is an nn.Linear (same parameters, same state dict) whose forward takes those kernels for a few
  rows on the CPU without autograd (decode steps); everywhere else it is F.linear, bit for bit.
- `compiled_decode_step` compiles one decode step (embedding -> layers -> logits, static KV cache) once per
  model and shape; prefill stays eager, where large matrix products are what the libraries do best.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype in (torch.float32, torch.bfloat16) and kernels.usable(x, self.weight, self.in_features):
            out = kernels.gemv(x, self.weight)
            return out + self.bias if self.bias is not None else out
        if (self.weight.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
                and not kernels.native_bf16()):  # emulated bf16 GEMM: widen the weights, multiply in fp32
            return kernels.fp32_matmul(x, lambda i, j: self.weight[i:j].float(), self.out_features, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_gemv_linears(model: nn.Module) -> nn.Module:
    """Swap every plain nn.Linear for a GemvLinear holding the same parameters (no copy)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                fast = GemvLinear.__new__(GemvLinear)
                nn.Module.__init__(fast)
                fast.in_features, fast.out_features = child.in_features, child.out_features
                fast.weight = child.weight
                fast.bias = child.bias
                setattr(module, child_name, fast)
    return model


COMPILE_MIN_BYTES = 50e6  # below this, compiling (tens of seconds) costs more than it saves in a session


def compile_enabled(model) -> bool:
    """Whether to compile the decode step: GLMTORCH_COMPILE=1 / 0 forces it; by default only where it pays, a
    model of at least 50 MB of weights on a device Inductor compiles for (CPU, CUDA)."""
    if model.device.type not in ("cpu", "cuda"):
        return False
    forced = os.environ.get("GLMTORCH_COMPILE", "").lower()
    if forced in ("0", "false", "no", "1", "true", "yes"):
        return forced in ("1", "true", "yes")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights >= COMPILE_MIN_BYTES


def decode_step(model, tokens, position_ids, cache_position, attention_mask, cache) -> torch.Tensor:
    """One token per row through the model with a static cache; returns (B, V) fp32 logits.

    attention_mask (B, L) also says how many leading cache slots attention reads (L); its length is marked
    dynamic, so one compiled graph serves every length."""
    cache.length = attention_mask.shape[1]
    out = model(tokens, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                cache_position=cache_position, use_cache=True)
    return out.logits[:, -1].float()


def compiled_decode_step(model):
    """The model's compiled decode step (built on first use, kept on the model), or the eager one when
    compiling is off or has failed once."""
    step = getattr(model, "_glmtorch_decode_step", None)
    if step is None:
        if model.device.type == "cpu":
            kernels.available()  # built before tracing, so the compiled graph calls them
        if not compile_enabled(model):
            step = decode_step
        else:
            compiled = torch.compile(decode_step, mode="reduce-overhead" if model.device.type == "cuda" else None)

            def step(*args):
                tokens, positions, mask, cache = args[1], args[2], args[4], args[5]
                torch._dynamo.mark_dynamic(mask, 1)  # the attended length grows every step
                for buffer in cache.keys + cache.values:  # and caches differ in size between calls
                    torch._dynamo.mark_dynamic(buffer, 2)
                # so do batches (the server's active requests change every few steps): one graph for every row
                # count from 2 up (a single row specializes, and gets its own)
                for t in (tokens, positions, mask, cache.seq_lengths, *cache.keys, *cache.values):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                try:
                    return compiled(*args)
                except Exception as e:  # no compiler toolchain, an unsupported op: stay correct, warn once
                    warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {e}); "
                                  "decoding eagerly", stacklevel=2)
                    model._glmtorch_decode_step = decode_step
                    return decode_step(*args)

        model._glmtorch_decode_step = step
    return step
