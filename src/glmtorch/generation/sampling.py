"""Choosing the next token: one callable built by `make_sampler`, seeded through a torch.Generator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import greedy_tokens
from .config import check_sampling_value

Sampler = Callable[[torch.Tensor], torch.Tensor]


def make_sampler(do_sample: bool, generator: torch.Generator | None = None) -> Sampler:
    """(B, V) processed logits -> (B,) token ids: argmax, or a draw from softmax(logits)."""
    if not do_sample:
        return greedy_tokens

    return lambda logits: sample_from_logits(logits, generator)


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) ids drawn from softmax(logits); generate() and the server both draw here."""
    probs = torch.softmax(logits.float(), dim=-1)
    if not bool(torch.isfinite(probs).all()):  # NaN logits, or every token masked: say so, not torch's assert
        raise ValueError("sampling met non-finite probabilities (the logits hold NaN or every token was "
                         "filtered out); check the model's weights and the sampling parameters")
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(check_sampling_value("seed", seed))
