"""Logits processors: callables `(tokens, logits) -> logits`, each equal to transformers' processor of the
same name on the same logits. `tokens` is the (B, L) history so far with left padding marked -1."""

from __future__ import annotations

import torch

from .config import GenerationConfig

NEG_INF = -float("inf")


def token_counts(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, vocab) how many times each token occurs in each row of `tokens`, in the logits' dtype; padding (-1) and
    ids past the vocabulary count for nothing."""
    vocab = logits.shape[-1]
    ids = tokens.masked_fill((tokens < 0) | (tokens >= vocab), vocab)  # padding goes to a dropped column
    counts = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=logits.device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))[:, :vocab]


class RepetitionPenalty:
    """Divide positive / multiply negative logits of every token already in the row's history."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(token_counts(tokens, logits) > 0, penalised, logits)


class LogitBias:
    """OpenAI's logit_bias: a fixed amount added to chosen tokens' logits (-100 bans a token in practice, +100
    all but forces it)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(-1, self.ids.to(logits.device), self.values.to(logits.device, logits.dtype)
                                .expand(logits.shape[0], -1))


class PresenceFrequencyPenalty:
    """OpenAI's penalties on what the reply has said so far (not the prompt, as vLLM counts them): a token's logit
    minus frequency x its count, minus presence once it has appeared at all. `prompt_length`: where the reply
    begins in the history."""

    def __init__(self, presence: float, frequency: float, prompt_length: int) -> None:
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        counts = token_counts(tokens[:, self.prompt_length:], logits)
        return logits - self.frequency * counts - self.presence * (counts > 0).to(logits.dtype)


class MinTokens:
    """vLLM's min_tokens: the stop tokens (end of turn, end of text) cannot be chosen before the reply has
    `min_tokens` tokens, unless nothing else is left (a constraint that allows only the end: a reply that must
    end is not made to go on with a token it forbids). `prompt_length`: where the reply begins in the history."""

    def __init__(self, stop_ids, min_tokens: int, prompt_length: int) -> None:
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long)
        self.min_tokens, self.prompt_length = min_tokens, prompt_length

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] - self.prompt_length >= self.min_tokens or not len(self.stop_ids):
            return logits
        ids = self.stop_ids[self.stop_ids < logits.shape[-1]].to(logits.device)
        masked = logits.index_fill(-1, ids, NEG_INF)
        something_left = torch.isfinite(masked).any(dim=-1, keepdim=True)
        return torch.where(something_left, masked, logits)


class Temperature:
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


class TopK:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        k = min(self.k, logits.shape[-1])
        kth = torch.topk(logits, k).values[..., -1:]
        return logits.masked_fill(logits < kth, NEG_INF)


class TopP:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - self.p)
        drop_sorted[..., -1:] = False  # the most likely token always stays
        drop = drop_sorted.scatter(1, order, drop_sorted)
        return logits.masked_fill(drop, NEG_INF)


class MinP:
    """Drop tokens less likely than min_p times the most likely token."""

    def __init__(self, min_p: float) -> None:
        self.min_p = min_p

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        drop = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        return logits.masked_fill(drop, NEG_INF)


def make_processors(config: GenerationConfig) -> list:
    """The processors a config asks for, in transformers' order (penalty, then the sampling warpers)."""
    processors: list = []
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(config.repetition_penalty))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(Temperature(config.temperature))
        if config.top_k:
            processors.append(TopK(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopP(config.top_p))
        if config.min_p:
            processors.append(MinP(config.min_p))
    return processors
