"""Every attention backend against eager (the reference) on the same inputs."""

import pytest
import torch

from glmtorch.attention import ATTENTION_BACKENDS, decode_attention, eager_attention
from glmtorch.cache import make_attention_mask


def qkv(B=2, H=6, KV=2, T=5, S=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, KV, S, D, generator=g),
            torch.randn(B, KV, S, D, generator=g))


@pytest.mark.parametrize("name", [n for n in ATTENTION_BACKENDS if n != "flash_attention_2"])
@pytest.mark.parametrize("T,S,padded", [(5, 5, False), (1, 7, False), (5, 5, True), (3, 8, True)])
def test_backend_matches_eager(name, T, S, padded):
    q, k, v = qkv(T=T, S=S)
    mask = None
    if padded or T not in (1, S):
        attention_mask = torch.ones(2, S, dtype=torch.long)
        attention_mask[1, :2] = 0
        mask = make_attention_mask(torch.arange(S - T, S), S, attention_mask if padded else None)
    ref, _ = eager_attention(q, k, v, mask, 0.25)
    out, probs = ATTENTION_BACKENDS[name](q, k, v, mask, 0.25)
    assert probs is None and out.shape == (2, T, 6, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H,KV", [(6, 2), (6, 1), (6, 6)])  # grouped, multi-query, multi-head
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "padded", "per_row"])
def test_decode_attention_matches_eager(H, KV, dtype, mask_kind):
    """The compiled decode step's attention (one query per row, plain reductions) against eager."""
    q, k, v = (t.to(dtype) for t in qkv(H=H, KV=KV, T=1, S=9, seed=3))
    mask = None
    if mask_kind == "padded":
        attention_mask = torch.ones(2, 9, dtype=torch.long)
        attention_mask[1, :3] = 0
        mask = make_attention_mask(torch.tensor([8]), 9, attention_mask)
    elif mask_kind == "per_row":  # rows at different lengths (continuous batching)
        mask = make_attention_mask(torch.tensor([[8], [4]]), 9, torch.ones(2, 9, dtype=torch.long))
    ref, _ = eager_attention(q.float(), k.float(), v.float(), mask, 0.25)
    out, probs = decode_attention(q, k, v, mask, 0.25)
    assert probs is None and out.shape == (2, 1, H, 16) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_eager_probabilities_are_causal_and_normalised():
    q, k, v = qkv()
    _, probs = eager_attention(q, k, v, None, 0.25, need_weights=True)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 6, 5))
    assert probs.triu(1).abs().max() == 0


def test_mask_lets_padding_queries_see_themselves():
    attention_mask = torch.tensor([[0, 0, 1, 1]])
    mask = make_attention_mask(torch.arange(4), 4, attention_mask)[0, 0]
    assert mask.tolist() == [[True, False, False, False], [False, True, False, False],
                             [False, False, True, False], [False, False, True, True]]
