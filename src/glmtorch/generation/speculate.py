"""Speculative decoding: more than one token per read of the weights.

Batch-1 decoding reads every weight once per token; checking k proposed tokens in one pass costs about the same,
because the pass is bandwidth-bound. Proposals come from the text itself (`propose`): the continuation of the
latest earlier occurrence of the sequence's last n tokens (n from `max_ngram` down to 1), which is right where
output repeats input: editing code, summarising, answering from a document, extracting JSON; or (`DraftModel`) a
smaller GLM with the same vocabulary, an int4 copy of the target say, decoding greedily ahead.

One round (`SpeculativeDecoder.round`): the pending token (sampled, its keys not yet in the cache) and the k
proposals go through the model in one pass; proposal i is accepted if it is what the model picks there, greedily
(argmax), or when sampling with the standard rule for a deterministic draft (accept with probability p(proposal),
else draw from p with the proposal removed), so sampled output has exactly the target distribution. The first
rejected position gives the next token; if all are accepted the last row gives one more. Rejected proposals' keys
stay in the cache beyond the sequence's end, never attended, overwritten by the next round.

How many to propose is chosen each round for the most expected tokens per second: the acceptance rate so far
gives the expected tokens of a pass of k proposals, (1 - a^(k+1)) / (1 - a), and each pass length's measured
time its cost (a bandwidth-bound fp32 pass of 5 tokens costs what one does; int4's multi-row kernels cost more,
so they get fewer). Where proposals keep failing, none are made (a single probe every 8 rounds): free generation
pays almost nothing.
"""

from __future__ import annotations

import time

import torch

from ..fastpath import verify_tokens


def propose(sequence: list[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
    """Up to `max_tokens` ids continuing the latest earlier occurrence of the sequence's last n ids, trying the
    longest n first; [] when none recurs. One vectorized comparison per n: a 30,000-token conversation is searched
    in about a millisecond (1.6 ms at worst, measured), so a server can propose for its rows every step.

    Where the occurrence is close to the end (a loop of period p < max_tokens: a repeated line, a list's
    pattern, a model stuck on one token), the copy runs on through what it has proposed, as an overlapping LZ77
    copy does: the loop continued, not cut at the sequence's end (on "small" fp32 looping on one token, 1-2
    tokens a pass became 8, as llama.cpp's lookup drafts)."""
    if max_tokens <= 0 or len(sequence) < 2:
        return []
    seq = torch.tensor(sequence, dtype=torch.long)
    for n in range(min(max_ngram, len(sequence) - 1), 0, -1):
        starts = len(sequence) - n  # candidate occurrences begin at 0 .. starts - 1 (the tail itself excluded)
        match = torch.ones(starts, dtype=torch.bool)
        for j in range(n):
            match &= seq[j:j + starts] == seq[starts + j]
        found = match.nonzero()
        if len(found):
            start = int(found[-1]) + n  # the latest occurrence: what followed it
            out = sequence[start:start + max_tokens]
            period = len(sequence) - start
            while len(out) < max_tokens:
                out.append(out[len(out) - period])
            return out
    return []


class DraftModel:
    """Proposals from a smaller model of the same vocabulary, greedy, with a cache of its own: each call first feeds
    it the tokens the sequence gained since the last call (the accepted ones and the correction), in one pass."""

    def __init__(self, draft, capacity: int) -> None:
        self.draft = draft
        self.cache = draft.new_static_cache(1, capacity)
        self.synced = 0  # leading tokens of the sequence whose keys the draft's cache holds

    def __call__(self, sequence: list[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
        if max_tokens <= 0:
            return []
        device = self.draft.device
        new = torch.tensor([sequence[self.synced:]], device=device)
        self.cache.length = len(sequence)
        logits = self.draft(new, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                            cache_position=torch.arange(self.synced, len(sequence), device=device)).logits[0, -1]
        self.synced = len(sequence)
        out = [int(logits.argmax())]
        for i in range(max_tokens - 1):  # written past the sequence's end: overwritten by the next call's catch-up
            position = len(sequence) + i
            self.cache.length = position + 1
            logits = self.draft(torch.tensor([[out[-1]]], device=device), past_key_values=self.cache,
                                use_cache=True, cache_position=torch.tensor([position], device=device)).logits[0, -1]
            out.append(int(logits.argmax()))
        return out


class SpeculativeDecoder:
    """Rounds of propose-and-verify for one sequence (batch 1) over a static cache."""

    def __init__(self, model, cache, mask, processors, sample, num_tokens: int, max_ngram: int,
                 generator: torch.Generator | None, greedy: bool, proposer=None) -> None:
        self.model, self.cache, self.mask, self.processors = model, cache, mask, processors
        self.sample, self.greedy, self.generator = sample, greedy, generator
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.proposer = proposer  # None: prompt lookup (propose)
        self.pass_seconds: dict[int, float] = {}  # tokens in a pass -> its time (a running average)
        self.idle = 0  # rounds in a row that chose to propose nothing
        self.proposed = self.accepted = self.rounds = 0  # totals, for benchmarks

    def _how_many(self, cap: int) -> int:
        """Proposals for the next pass: the count with the most expected tokens per second (see the module)."""
        if cap <= 0:
            return 0
        one = self.pass_seconds.get(1)
        rate = (self.accepted + 1) / (self.proposed + 2)  # acceptance so far, starting from one half
        best, best_speed = 0, 1.0 / one if one else 0.0
        for k in range(1, cap + 1):
            seconds = self.pass_seconds.get(k + 1, one or 1.0)  # not tried yet: assume it costs what one token does
            expected = (1 - rate ** (k + 1)) / (1 - rate)
            if expected / seconds > best_speed:
                best, best_speed = k, expected / seconds
        self.idle = self.idle + 1 if best == 0 else 0
        return 1 if best == 0 and self.idle % 8 == 0 else best  # an occasional probe: the text may turn repetitive

    def _choose(self, history: torch.Tensor, logits: torch.Tensor, proposal: int | None) -> tuple[int, bool]:
        """(token, whether it is the proposal) at one position: logits (V,) raw, history (1, n) before it."""
        row = logits[None].float()
        for process in self.processors:
            row = process(history, row)
        if proposal is None:
            return int(self.sample(row)[0]), False
        if self.greedy:
            best = int(row[0].max(-1).indices)
            return best, best == proposal
        probs = torch.softmax(row[0], -1)
        if float(torch.rand((), generator=self.generator)) < float(probs[proposal]):
            return proposal, True
        probs[proposal] = 0  # rejected: draw from what is left (p minus the one-hot draft, renormalised)
        if float(probs.sum()) <= 0:
            return proposal, True
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator)), False

    def round(self, history: torch.Tensor, length: int, position: int, slot: int, room: int) -> list[int]:
        """Tokens after history[:, :length] (its last one, the pending token, not yet in the cache; `position` its
        rotary position, `slot` its cache slot); at most `room` of them. The first is always there."""
        sequence = history[0, :length].tolist()
        proposals = (self.proposer or propose)(sequence, self._how_many(min(room - 1, self.num_tokens)),
                                               self.max_ngram)
        tokens = torch.tensor([sequence[-1]] + proposals, device=history.device)
        start = time.perf_counter()
        logits = verify_tokens(self.model, tokens, position, slot, self.mask[:, :slot + len(tokens)], self.cache)
        seconds = time.perf_counter() - start
        known = self.pass_seconds.get(len(tokens))
        self.pass_seconds[len(tokens)] = seconds if known is None else 0.8 * known + 0.2 * seconds
        out = []
        for i, proposal in enumerate(proposals + [None]):
            if i:  # the history the processors see at position i: the accepted proposals before it
                history[0, length + i - 1] = out[-1]
            token, accepted = self._choose(history[:, :length + i], logits[i], proposal)
            out.append(token)
            if not accepted:
                break
        taken = len(out) - 1  # accepted proposals; the last token is the correction, or one more after them all
        self.rounds += 1
        self.proposed += len(proposals)
        self.accepted += taken
        return out
