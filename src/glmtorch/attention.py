"""Attention backends behind one signature.

    backend(q, k, v, mask, scale, dropout_p=0.0, need_weights=False) -> (out, probs or None)

    q: (B, H, T, D)       k, v: (B, KV, S, D) with H a multiple of KV (grouped-query attention)
    mask: bool (B or 1, 1, T, S), True where a query may look at a key; or None, which means plain
          causal attention aligned to the last query (T == S for a prefill, T == 1 for a decode step).
    out: (B, T, H, D)     probs: (B, H, T, S) when need_weights, else None

Eager is the reference; every other backend is tested against it on the same inputs. Choosing a backend is
a dictionary lookup (`ATTENTION_BACKENDS[name]`), never an if-chain inside the layer.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KV, S, D) -> (B, KV * groups, S, D): each key/value head serves `groups` query heads."""
    if groups == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, groups, s, d).reshape(b, kv * groups, s, d)


def eager_attention(q, k, v, mask, scale, dropout_p=0.0, need_weights=False):
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, T, S)
    if mask is None:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v).transpose(1, 2)  # (B, T, H, D)
    return out, (probs if need_weights else None)


def decode_attention(q, k, v, mask, scale):
    """One query per row (a decode step) written as plain reductions, for a compiled CPU graph: Inductor fuses
    them into a few loops, where the SDPA kernel spends ~0.1 ms per call setting up for long sequences (measured:
    that was ~10% of a batch-1 int4 step). fp32 throughout, as SDPA accumulates."""
    B, H, _, D = q.shape
    KV = k.shape[1]
    dtype = q.dtype
    q = q.float().view(B, KV, H // KV, 1, D)  # query heads grouped under their key/value head
    scores = (q * k.float()[:, :, None]).sum(-1) * scale  # (B, KV, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, -1), float("-inf"))
    probs = scores.softmax(-1)
    out = (probs[..., None] * v.float()[:, :, None]).sum(-2)  # (B, KV, G, D)
    return out.view(B, H, 1, D).transpose(1, 2).to(dtype), None  # (B, 1, H, D)


def sdpa_attention(q, k, v, mask, scale, dropout_p=0.0, need_weights=False):
    if need_weights:  # SDPA never materialises the probabilities; the caller asked for them
        return eager_attention(q, k, v, mask, scale, dropout_p, need_weights)
    if q.shape[2] == 1 and not dropout_p and q.device.type == "cpu" and torch.compiler.is_compiling():
        return decode_attention(q, k, v, mask, scale)
    groups = q.shape[1] // k.shape[1]
    if q.shape[2] == 1 and groups > 1 and not dropout_p and q.device.type == "cpu":
        # A decode step under grouped-query attention: the G query heads of a key/value head read the same keys,
        # so they go in as G queries of one head (no causal mask: one position sees every key it is allowed).
        # The CPU kernel then multiplies (G x D) blocks instead of G separate vectors: 64 rows, 16 heads over 2,
        # 191 keys took 0.59 ms against 0.95 in bf16, 0.67 against 1.48 in fp32 (AMX Xeon, 2 threads).
        B, H, _, D = q.shape
        out = F.scaled_dot_product_attention(q.view(B, k.shape[1], groups, D), k, v, attn_mask=mask, scale=scale)
        return out.view(B, 1, H, D), None  # (B, KV, G, D) is (B, H, 1, D) in memory: (B, T=1, H, D)
    is_causal = mask is None and q.shape[2] > 1
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=groups > 1,
    )
    return out.transpose(1, 2), None  # (B, T, H, D)


def flash_attention(q, k, v, mask, scale, dropout_p=0.0, need_weights=False):
    """FlashAttention-2 (the flash_attn package, CUDA only). Its kernels take no arbitrary mask: padded
    batches (a mask is given) go through SDPA, which on CUDA dispatches to its own memory-efficient kernel."""
    if need_weights or mask is not None:
        return sdpa_attention(q, k, v, mask, scale, dropout_p, need_weights)
    from flash_attn import flash_attn_func

    out = flash_attn_func(  # (B, T, H, D) layout in and out; GQA and bottom-right causal built in
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, softmax_scale=scale, causal=q.shape[2] > 1,
    )
    return out, None


ATTENTION_BACKENDS = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash_attention_2": flash_attention,
}


def check_attention_backend(name: str, device: torch.device | str | None = None) -> str:
    """Validate `attn_implementation` where it enters, with a message that says what to do."""
    name = name or "sdpa"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_implementation={name!r} is not known; choose one of "
                         f"{', '.join(repr(n) for n in ATTENTION_BACKENDS)}")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation='flash_attention_2' needs the flash_attn package "
                             "(pip install flash-attn); use 'sdpa' otherwise")
        if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
            raise ValueError("attn_implementation='flash_attention_2' runs only on a CUDA device; "
                             "load the model with device='cuda' or use 'sdpa'")
    return name
