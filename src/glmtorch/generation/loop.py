"""The decode loop: prefill the prompt once, then one token per step through the KV cache.

`decode_tokens` is a generator of (tokens, logits, finished) per step, so callers (generate, the streaming
text generator, the server) share one loop. Rows that finish keep stepping with the pad token, as in
transformers, so a batch stays rectangular.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..fastpath import compiled_decode_step, lend_static_cache, return_static_cache
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
    constraints: list = (),
    logits_processor: list = (),
    assistant_model=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), processed fp32 logits (B, V), finished (B,) bool) for each new position.

    Prefill runs eagerly into a preallocated static cache; each decode step then runs the model's compiled
    decode step (fastpath.compiled_decode_step), whose only varying shape is the attended length.
    `constraints` (grammar masks) run before the configured processors, so top-k / top-p choose among allowed
    tokens only; a caller's `logits_processor` after them. With `config.prompt_lookup_num_tokens` or an
    `assistant_model` (a draft), a batch of one decodes speculatively (generation.speculate: several tokens per
    pass, yielded one by one, logits None).
    """
    B, T = input_ids.shape
    step = compiled_decode_step(model)
    # A step replayed as a CUDA graph attends the whole cache: rounded up to 256 slots, its length is one of a
    # few (the slots past the request's are never written), and the cache is the model's kept one (fastpath.
    # lend_static_cache), at the addresses the graphs were recorded with.
    whole_cache = getattr(step, "attends_whole_cache", False)
    capacity = T + max_new_tokens
    slots = -(-capacity // 256) * 256 if whole_cache else capacity
    cache = lend_static_cache(model, B, slots) if whole_cache else model.new_static_cache(B, slots)
    try:
        yield from _decode(model, input_ids, attention_mask, config, max_new_tokens, generator, stop_checks,
                           constraints, logits_processor, assistant_model, step, cache, whole_cache)
    finally:
        if whole_cache:
            return_static_cache(cache)


def _decode(model, input_ids, attention_mask, config, max_new_tokens, generator, stop_checks, constraints,
            logits_processor, assistant_model, step, cache, whole_cache):
    B, T = input_ids.shape
    device = input_ids.device
    processors = list(constraints) + make_processors(config) + list(logits_processor)
    sample = make_sampler(config.do_sample, generator)
    eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device)
    sync_tokens = getattr(model, "tp_sync_tokens", None)  # tensor parallel: every rank takes rank 0's tokens
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Left padding shifts each row's positions so its first real token sits at position 0.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    capacity = T + max_new_tokens
    slots = cache.max_length
    # What the processors and stop checks may look at, preallocated: left padding is marked -1.
    history = torch.full((B, capacity), -1, dtype=torch.long, device=device)
    history[:, :T] = input_ids.masked_fill(attention_mask == 0, -1)
    # Slot j of every row holds column j of the batch: padding is marked once; slots not yet written are
    # hidden by causality. Each forward reads the prefix of the mask (and cache) written so far.
    mask = torch.ones(B, slots, dtype=torch.long, device=device)
    mask[:, :T] = attention_mask
    cache.length = T  # the prompt attends to itself only
    out = model(input_ids, attention_mask=mask[:, :T], position_ids=positions, past_key_values=cache,
                cache_position=torch.arange(T, device=device), use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    next_position = positions[:, -1:] + 1  # (B, 1)
    slot = torch.tensor([T], device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    speculative = config.prompt_lookup_num_tokens or (assistant_model is not None)
    if speculative and B == 1 and sync_tokens is None:
        from .speculate import DraftModel, SpeculativeDecoder

        proposer, num_tokens = None, config.prompt_lookup_num_tokens
        if assistant_model is not None:  # a draft model proposes (transformers' num_assistant_tokens, default 5)
            num_tokens = config.num_assistant_tokens or 5
            proposer = DraftModel(assistant_model, capacity + num_tokens)
        decoder = SpeculativeDecoder(model, cache, mask, processors, sample, num_tokens,
                                     config.max_matching_ngram_size or 3, generator, not config.do_sample, proposer)
        model._glmtorch_speculation = decoder  # its acceptance counts, for benchmarks
        for process in processors:
            logits = process(history[:, :T], logits)
        pending = sample(logits)
        produced = 0
        while True:
            for token in pending:
                history[:, T + produced] = token
                done = torch.isin(token[None], eos)
                for check in stop_checks:
                    done |= check(history[:, :T + produced + 1])
                produced += 1
                yield token[None], None, done
                if bool(done.all()) or produced == max_new_tokens:
                    return
            pending = torch.tensor(decoder.round(history, T + produced, int(next_position), int(slot),
                                                 max_new_tokens - produced), device=device)
            next_position, slot = next_position + len(pending), slot + len(pending)
    for i in range(max_new_tokens):
        for process in processors:
            logits = process(history[:, :T + i], logits)
        tokens = sample(logits).masked_fill(finished, pad)
        if sync_tokens is not None:
            tokens = sync_tokens(tokens)
        history[:, T + i] = tokens
        done = torch.isin(tokens, eos)
        for check in stop_checks:
            done |= check(history[:, :T + i + 1])
        finished = finished | done
        yield tokens, logits, finished
        if i == max_new_tokens - 1 or bool(finished.all()):
            return
        # attend to the slots written so far: the mask's length (dynamic in the compiled step) says how many;
        # a step replayed as a CUDA graph attends the whole cache, the same shape every step
        attended = slots if whole_cache else T + i + 1
        logits = step(model, tokens[:, None], next_position, slot, mask[:, :attended], cache).float()
        next_position = next_position + 1
        slot = slot + 1
