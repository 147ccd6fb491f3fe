"""Stopping rules beyond end-of-sequence ids: stop strings, checked on decoded text."""

from __future__ import annotations

import torch


class StopStrings:
    """Marks a row done once its generated text contains one of `stop_strings`.

    Only the last few tokens are decoded each step (enough to hold the longest stop string), so the check
    costs the same at step 10 and step 10,000.
    """

    def __init__(self, stop_strings: str | list[str], tokenizer, prompt_length: int) -> None:
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not self.stop_strings or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings={stop_strings!r}: expected a non-empty string or a list of them")
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        # A token is at least one byte, so this many tokens always cover the longest stop string (+1 for
        # a partial character at the front of the window).
        self.window = max(len(s.encode()) for s in self.stop_strings) + 1

    def __call__(self, history: torch.Tensor) -> torch.Tensor:
        generated = history[:, self.prompt_length:]
        tail = generated[:, -self.window:].tolist()
        texts = [self.tokenizer.decode([t for t in row if t >= 0]) for row in tail]
        return torch.tensor([any(s in text for s in self.stop_strings) for text in texts], device=history.device)


def find_stop(text: str, stop_strings: list[str]) -> int:
    """Index where the first stop string starts in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else -1


def partial_stop_length(text: str, stop_strings: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string: text to hold back."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
