"""Choosing the next token: one callable built by `make_sampler`, seeded through a torch.Generator."""

from __future__ import annotations

from collections.abc import Callable

import torch

Sampler = Callable[[torch.Tensor], torch.Tensor]


def make_sampler(do_sample: bool, generator: torch.Generator | None = None) -> Sampler:
    """(B, V) processed logits -> (B,) token ids: argmax, or a draw from softmax(logits)."""
    if not do_sample:
        return lambda logits: torch.argmax(logits, dim=-1)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    return sample


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative integer")
    return torch.Generator(device=device).manual_seed(seed)
