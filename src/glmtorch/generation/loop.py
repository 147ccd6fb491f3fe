"""The decode loop: prefill the prompt once, then one token per step through the KV cache.

`decode_tokens` is a generator of (tokens, logits, finished) per step, so callers (generate, the streaming
text generator, the server) share one loop. Rows that finish keep stepping with the pad token, as in
transformers, so a batch stays rectangular.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..cache import DynamicCache
from .processors import make_processors
from .sampling import make_sampler

StopCheck = Callable[[torch.Tensor], torch.Tensor]  # (B, L) history -> (B,) bool "this row is done"


@torch.no_grad()
def decode_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    stop_checks: list[StopCheck] = (),
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), processed fp32 logits (B, V), finished (B,) bool) for each new position."""
    B, T = input_ids.shape
    device = input_ids.device
    processors = make_processors(config)
    sample = make_sampler(config.do_sample, generator)
    eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device)
    sync_tokens = getattr(model, "tp_sync_tokens", None)  # tensor parallel: every rank takes rank 0's tokens
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Left padding shifts each row's positions so its first real token sits at position 0.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    history = input_ids.masked_fill(attention_mask == 0, -1)  # what the processors may look at
    cache = DynamicCache()
    out = model(input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    next_position = positions[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        for process in processors:
            logits = process(history, logits)
        tokens = sample(logits).masked_fill(finished, pad)
        if sync_tokens is not None:
            tokens = sync_tokens(tokens)
        history = torch.cat([history, tokens[:, None]], dim=1)
        done = torch.isin(tokens, eos)
        for check in stop_checks:
            done |= check(history)
        finished = finished | done
        yield tokens, logits, finished
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        out = model(tokens[:, None], attention_mask=attention_mask, position_ids=next_position,
                    past_key_values=cache, use_cache=True)
        next_position = next_position + 1
