"""Continuous batching: one thread owns the model and a static KV cache of `max_batch` rows (slots).

Every step decodes one token for every active request together; the requests waiting for a slot are prefilled
between steps, several in one forward pass (up to `prefill_tokens` padded tokens, so a burst of arrivals costs a
few large matrix products instead of many small ones and running streams pause only briefly), and join the
next step; a finished or cancelled request leaves at once and its slot is reused. While streams decode, a pass
takes only what this machine prefills in `prefill_seconds`; a prompt longer than that goes in chunks, one per
loop turn between decode steps.
Each request keeps its own sampling parameters and random generator, so a seed gives the same text whether
the request runs alone or in a full batch.

Prefix reuse (llama-server's slot cache reuse, on by default): a slot keeps the keys and values of the request that
last used it after that request leaves, and a new request starts from the longest prefix of its prompt that any
slot holds (a finished conversation's, the system prompt of a request still running), copied into its own slot,
and prefills only the rest: a chat client resending its history, or 100 requests behind one system prompt, pay
for the new part. Free slots are given out least recently used first.

Under tensor parallelism (`torchrun ... glmtorch serve`), rank 0 schedules and serves HTTP; every operation on the
model or its cache goes through `_do`, which first sends it to the other ranks, where `follow()` runs the same
operation on their shard (the collectives inside the forward pass then meet). Only rank 0 samples: the logits are
gathered on every rank, and the tokens travel in the next operation.

Where the loop runs matters on a CPU: torch's OpenMP threads answer a parallel region started from the process's
main thread in ~9 us, from any other thread in ~70 us (measured with 2 threads, AMX Xeon; libgomp keeps only the
main thread's team spinning), which made a 64-row step of "small" bf16 135 ms instead of 108 ms. So `glmtorch
serve` runs the loop in the main thread (`Engine(..., thread=False)`, then `run()`) and the HTTP server beside
it; embedded uses (tests, notebooks) get their own thread by default.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..fastpath import compiled_decode_step
from ..generation.config import GenerationConfig
from ..generation.processors import make_processors
from ..generation.sampling import greedy_tokens, sample_from_logits
from ..generation.streaming import TextStream


MIN_PREFIX = 16  # shorter shared prefixes are not worth a copy (one block, as vLLM's prefix cache counts them)


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # keep going past end-of-turn / end-of-text tokens (benchmarks)
    constraint: object = None  # a compiled generation.constrain.Constraint: the output must follow it

    def generation_config(self) -> GenerationConfig:
        greedy = self.temperature == 0
        return GenerationConfig(do_sample=not greedy, temperature=None if greedy else self.temperature,
                                top_p=self.top_p, top_k=self.top_k, min_p=self.min_p or None,
                                repetition_penalty=self.repetition_penalty)


@dataclass
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    token_logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, how many came from the prefix cache
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-side state
    slot: int = -1
    position: int = 0
    last_token: int = 0
    generated: int = 0
    history: torch.Tensor | None = None  # (1, prompt + max_tokens), filled as tokens come: no per-token concat
    processors: list = field(default_factory=list)
    generator: torch.Generator | None = None
    text: TextStream | None = None
    pending_logprobs: list[dict] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0  # when its latest token was made (inter-token latency)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache, not a prefill
    speculate: int = -1  # proposals to make next step (speculative decoding; -1: not decided yet)


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None,
                 stop_ids: set[int] | None = None, prefill_tokens: int = 2048, thread: bool = True,
                 prefill_seconds: float = 1.0, prefix_caching: bool = True, speculative_tokens: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_tokens = prefill_tokens
        # While streams are decoding, a prefill pass is also their wait for the next token: it takes at most as
        # many tokens as this machine prefills in `prefill_seconds` (measured on the passes so far). Small bf16 on
        # the AMX Xeon prefills 2048 tokens in 0.6 s (no change), fp32 in 2.4 s: a 2.5 s gap in every stream.
        self.prefill_seconds = prefill_seconds
        self.prefill_rate: float | None = None  # tokens per second, a running average over passes
        self.chunking: Request | None = None  # a prompt longer than one pass, prefilled a chunk per loop turn
        self.observer = None  # serve.metrics.ServingMetrics, or anything with first_token / token / finished
        self.context = min(max_context or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.stop_ids = set(stop_ids or ())
        # One row more than can ever be active: a decode step reads a view of the first `active` rows, and a view
        # of all rows would be contiguous where every other is not, which a compiled step guards on: the first
        # full batch recompiled it, a 60-75 s stall for every stream (measured on "small" bf16, 64 at once).
        self.cache = model.new_static_cache(max_batch + 1, self.context)
        self.ones = torch.ones(max_batch, self.context, dtype=torch.long, device=model.device)
        self.slots: list[Request | None] = [None] * max_batch
        # prompt-lookup speculation for greedy requests while few decode (where a step is bandwidth-bound)
        self.speculative_tokens = speculative_tokens
        self.speculated = self.speculation_accepted = 0
        # What each free slot's cache rows still hold (token ids whose keys and values are valid there), and when
        # it was last used; a running request's are its history up to its position. Row max_batch is scratch.
        self.prefix_caching = prefix_caching
        self.kept: list[torch.Tensor] = [torch.empty(0, dtype=torch.long) for _ in range(max_batch + 1)]
        self.kept_at: list[float] = [0.0] * (max_batch + 1)
        self.prefix_queries = 0  # prompt tokens admitted
        self.prefix_hits = 0  # of those, tokens whose keys and values came from the prefix cache
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.running = True
        self.step_fn = compiled_decode_step(model)
        self.device = model.device
        self.tp = getattr(model, "tensor_parallel", None)  # a TensorParallel when the model is a shard
        self.steps = 0  # decode steps
        self.prefill_passes = 0  # forward passes that prefilled prompts (several requests each under load)
        self.thread = None
        if thread:
            self.thread = threading.Thread(target=self.run, name="glmtorch-engine", daemon=True)
            self.thread.start()

    # -- the outside ---------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self.cond:
            if not self.running:
                raise QueueFull("the server is shutting down")
            # Count requests not yet taken into a slot too: the engine thread may not have admitted them yet.
            if self.active + len(self.waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            prompt = torch.tensor(request.prompt_ids, dtype=torch.long)
            request.history = torch.empty(1, len(prompt) + request.params.max_tokens, dtype=torch.long)
            request.history[0, :len(prompt)] = prompt
            # a constraint masks first, so that top-k / top-p pick among the tokens it allows
            request.processors = ([request.params.constraint.processor()] if request.params.constraint else []) \
                + make_processors(request.params.generation_config())
            request.generator = torch.Generator().manual_seed(
                request.params.seed if request.params.seed is not None else int.from_bytes(os.urandom(6), "little"))
            request.text = TextStream(self.tokenizer, request.params.stop, self.stop_ids, request.params.ignore_eos)
            self.waiting.append(request)
            self.cond.notify()

    def stop(self) -> None:
        """End every request with an error and stop the loop's thread (SIGTERM / Ctrl-C)."""
        self.request_stop()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=30)
        self._end_all()  # if the loop is stuck in a step, its clients hear now; if not, this finds nothing

    def request_stop(self) -> None:
        """Ask the loop to end every request with an error and return: only sets a flag, so a signal handler
        may call it while the loop it interrupted holds the lock (the loop polls the flag while idle)."""
        self.running = False

    def _end_all(self) -> None:
        with self.cond:
            self.chunking = None
            for r in list(self.waiting) + [s for s in self.slots if s is not None]:
                r.emit(Event("error", error="the server is shutting down"))
            self.waiting.clear()
            self.slots = [None] * self.max_batch

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def cache_usage(self) -> float:
        """Fraction of the cache's token slots (max_batch x context) holding a running request's tokens."""
        used = sum(r.position for r in list(self.slots) if r is not None)
        return used / (self.max_batch * self.context)

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self, until_idle: bool = False) -> None:
        """The loop: admit, prefill, decode, until request_stop() (or, with until_idle, until nothing is left to
        do). Runs in the engine's own thread, or in the caller's when it was made with thread=False."""
        with torch.no_grad():  # not set_grad_enabled: in the caller's thread, its grad mode must come back
            self._loop(until_idle)
        if self.tp is not None and not until_idle:
            self._do("stop")  # the other ranks leave follow()

    def _loop(self, until_idle: bool) -> None:
        while True:
            with self.cond:
                while self.running and not self.waiting and not any(self.slots):
                    if until_idle:
                        return
                    self.cond.wait(timeout=0.25)  # a timeout: request_stop() does not notify
                if not self.running:
                    break
                # a prompt being prefilled in chunks goes on first; others wait behind it, as in a queue
                admitted = [] if self.chunking is not None else self._take_waiting()
            try:
                if self.chunking is not None:
                    self._prefill_chunk(self.chunking)
                elif len(admitted) == 1 and \
                        len(admitted[0].prompt_ids) - admitted[0].position > self._prefill_budget(admitted):
                    self.chunking = admitted[0]
                    self._prefill_chunk(self.chunking)
                elif admitted:
                    self._prefill(admitted)
                    # Let the server's event loop send the first tokens now: the decode step that follows holds
                    # the GIL for most of its run (compiled kernels), which would hold them back a whole step.
                    time.sleep(0.001)
                self._drop_cancelled()
                if any(self.slots):
                    self._decode_step()
            except Exception as e:  # the batched forward itself failed: every row in it is lost, nobody hangs
                with self.cond:
                    for r in [r for r in self.slots if r is not None]:
                        self._fail(r, e)
        self._end_all()

    def _take_waiting(self) -> list[Request]:
        """Move waiting requests into free slots (the free slots follow the occupied ones), as many as fit in one
        prefill pass: `prefill_tokens` padded tokens (fewer while others decode, see prefill_seconds), and always at
        least one."""
        out: list[Request] = []
        longest = 0
        budget = self._prefill_budget()
        for slot in range(self.max_batch):
            while self.slots[slot] is None and self.waiting:
                request = self.waiting[0]
                if request.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                reuse, source = self._longest_prefix(request.prompt_ids)
                rest = len(request.prompt_ids) - reuse
                padded = max(longest, rest) * (len(out) + 1)
                reach = max([r.position for r in out] + [reuse]) + max(longest, rest)  # padded writes stay inside
                if out and (padded > budget or reach > self.context):
                    return out
                self.waiting.popleft()
                longest = max(longest, rest)
                self._place(request, slot, reuse, source)
                out.append(request)
        return out

    # -- prefix reuse ----------------------------------------------------------------------------------------
    def _row_tokens(self, row: int) -> torch.Tensor:
        """The token ids whose keys and values cache row `row` holds, from position 0."""
        r = self.slots[row] if row < self.max_batch else None
        return r.history[0, :r.position] if r is not None else self.kept[row]

    def _longest_prefix(self, prompt: list[int]) -> tuple[int, int]:
        """(tokens, row): the longest prefix of `prompt` some cache row holds, leaving at least one prompt token to
        prefill (its logits give the first token); (0, -1) when none is worth copying."""
        if not self.prefix_caching or len(prompt) < 2:
            return 0, -1
        ids = torch.tensor(prompt[:-1], dtype=torch.long)
        best, source = 0, -1
        for row in range(self.max_batch):
            held = self._row_tokens(row)
            n = min(len(held), len(ids))
            if n <= best:
                continue
            differ = (held[:n] != ids[:n]).nonzero()
            common = int(differ[0]) if len(differ) else n
            if common > best:
                best, source = common, row
        return (best, source) if best >= MIN_PREFIX else (0, -1)

    def _place(self, request: Request, slot: int, reuse: int, source: int) -> None:
        """Put `request` into free slot `slot` with the first `reuse` tokens of its prompt already in its cache row,
        copied from row `source`; what `slot` held moves to the least recently used free row (if it is worth more
        than what that row holds: newer), so that free rows are overwritten least recently used first."""
        kept = self.kept[slot]
        if source != slot and len(kept) and self.prefix_caching:
            free = [row for row in range(slot + 1, self.max_batch) if self.slots[row] is None and row != source]
            if free:
                oldest = min(free, key=lambda row: self.kept_at[row])
                if self.kept_at[oldest] < self.kept_at[slot]:
                    self._do("copy_prefix", slot, oldest, len(kept))
                    self.kept[oldest], self.kept_at[oldest] = kept, self.kept_at[slot]
        if reuse and source != slot:
            self._do("copy_prefix", source, slot, reuse)
        self.kept[slot] = torch.empty(0, dtype=torch.long)
        self.slots[slot] = request
        request.slot, request.position, request.cached_tokens = slot, reuse, reuse
        self.prefix_queries += len(request.prompt_ids)
        self.prefix_hits += reuse

    def _prefill_budget(self, prefilling: list[Request] = ()) -> int:
        """Prompt tokens one prefill pass may take: `prefill_tokens`, and while others (requests not in
        `prefilling`) decode only what the measured rate prefills in `prefill_seconds` (at least 16)."""
        others = any(r is not None and r not in prefilling for r in self.slots)
        if self.prefill_rate is not None and others:
            return max(16, min(self.prefill_tokens, int(self.prefill_rate * self.prefill_seconds)))
        return self.prefill_tokens

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.slots if r is not None and r.cancelled.is_set()]:
            self._release(r)

    def _release(self, r: Request, keep: bool = True) -> None:
        """Free r's slot, keeping the occupied slots packed at the front: the last one moves into the gap, so a
        decode step only computes rows [0, active). r's keys and values stay cached in the row it leaves behind
        (the two rows swap) unless `keep` is False (a failed pass may have left them half written)."""
        slot = r.slot
        if not (0 <= slot < self.max_batch and self.slots[slot] is r):
            return
        tokens = r.history[0, :r.position].clone() if keep and self.prefix_caching else torch.empty(0, dtype=torch.long)
        last = max(i for i, s in enumerate(self.slots) if s is not None)
        if last != slot:
            moved = self.slots[last]
            if len(tokens):  # swap through the scratch row, copying only what each row holds
                self._do("swap_rows", slot, last, len(tokens), moved.position + 1)
            else:
                self._do("move_row", last, slot)
            moved.slot, self.slots[slot] = slot, moved
            self.slots[last] = None
            slot = last
        else:
            self.slots[slot] = None
        self.kept[slot], self.kept_at[slot] = tokens, time.perf_counter()
        r.slot = -1

    def _prefill(self, requests: list[Request]) -> None:
        """Prompts of requests in consecutive slots, right-padded into one batch; each starts after the prefix its
        row already holds (request.position, from the prefix cache). Padding writes keys past each prompt's end; no
        query ever sees them (a query at position p sees keys <= p), and decoding overwrites them."""
        first = requests[0].slot
        starts = torch.tensor([r.position for r in requests])
        lengths = torch.tensor([len(r.prompt_ids) - r.position for r in requests])
        T = int(lengths.max())
        ids = torch.zeros(len(requests), T, dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, :lengths[i]] = torch.tensor(r.prompt_ids[r.position:])
        if bool((starts == 0).all()):  # one set of positions for every row: the plain causal fast path
            real, positions = (torch.arange(T) < lengths[:, None]).long(), torch.arange(T)
        else:  # each row at its own positions; the causal rule alone keeps every real query on its own keys
            real, positions = None, starts[:, None] + torch.arange(T)
        self.prefill_passes += 1
        start = time.perf_counter()
        # the prompts attend to their prefixes and themselves only
        logits = self._do("prefill", ids, lengths, real, first, len(requests), int(starts.max()) + T, positions)
        self._note_prefill_rate(T * len(requests), time.perf_counter() - start)
        for r, row_logits in zip(requests, logits):
            r.position = len(r.prompt_ids)
            self._accept_or_fail(r, row_logits)

    # -- operations on the model and its cache (every rank runs each, under tensor parallelism) ------------------
    def _do(self, op: str, *args):
        if self.tp is not None:  # rank 0: the other ranks run the same operation on their shards
            import torch.distributed as dist

            dist.broadcast_object_list([(op, args)], src=0)
        return getattr(self, f"_op_{op}")(*args)

    def follow(self) -> None:
        """A tensor-parallel rank other than 0: run the operations rank 0 sends, until it stops."""
        import torch.distributed as dist

        with torch.no_grad():
            while True:
                box = [None]
                dist.broadcast_object_list(box, src=0)
                op, args = box[0]
                if op == "stop":
                    return
                getattr(self, f"_op_{op}")(*args)

    def _op_prefill(self, ids, lengths, real, first: int, count: int, length: int, positions) -> torch.Tensor:
        rows = self.cache.rows(first, first + count)
        rows.length = length
        return self.model.last_token_logits(ids.to(self.device), lengths, None if real is None else
                                            real.to(self.device), rows, positions.to(self.device))

    def _op_step(self, tokens, positions, window: int, rows: int) -> torch.Tensor:
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        return self.step_fn(self.model, tokens, positions, positions, self.ones[:rows, :window],
                            self.cache.rows(0, rows))

    def _op_copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_prefix(src, dst, length)

    def _op_move_row(self, src: int, dst: int) -> None:
        self.cache.move_row(src, dst)

    def _op_swap_rows(self, freed: int, last: int, freed_length: int, last_length: int) -> None:
        """Row `last` moves into row `freed`, and what `freed` held into `last` (through the scratch row)."""
        scratch = self.max_batch
        self.cache.copy_prefix(freed, scratch, freed_length)
        self.cache.copy_prefix(last, freed, last_length)
        self.cache.copy_prefix(scratch, last, freed_length)
        self.cache.seq_lengths[freed] = self.cache.seq_lengths[last]

    def _op_stop(self) -> None:
        """Nothing here: followers leave follow() on it."""

    def prefix_cache_stats(self) -> dict:
        """Prompt tokens admitted, and how many of them the prefix cache supplied (vLLM's queries / hits)."""
        return {"queries": self.prefix_queries, "hits": self.prefix_hits}

    def _prefill_chunk(self, r: Request) -> None:
        """The next chunk of a prompt longer than one pass, into its slot after the chunks before it: every
        other stream waits one chunk, not the whole prompt (a 30,000-token prompt is ~40 s of fp32 prefill on two
        cores). Until its last chunk the request sits out of the decode steps' results."""
        if r.cancelled.is_set() or r.slot < 0:
            self.chunking = None
            return
        start = r.position  # the prompt tokens in its cache so far
        end = min(len(r.prompt_ids), start + self._prefill_budget([r]))
        self.prefill_passes += 1
        began = time.perf_counter()
        # this chunk attends to the chunks before it and to itself
        logits = self._do("prefill", torch.tensor([r.prompt_ids[start:end]]), torch.tensor([end - start]),
                          torch.ones(1, end, dtype=torch.long), r.slot, 1, end, torch.arange(start, end))
        self._note_prefill_rate(end - start, time.perf_counter() - began)
        # a decode step that runs meanwhile computes this row too and writes its key at `position`: the next
        # chunk starts there and overwrites it
        r.position = end
        if end == len(r.prompt_ids):
            self.chunking = None
            self._accept_or_fail(r, logits[0])

    def _note_prefill_rate(self, tokens: int, seconds: float) -> None:
        if tokens >= 256:  # a pass big enough to time: small ones are mostly fixed costs
            rate = tokens / seconds
            self.prefill_rate = rate if self.prefill_rate is None else 0.5 * (self.prefill_rate + rate)

    def _decode_step(self) -> None:
        active = [(i, r) for i, r in enumerate(self.slots) if r is not None]  # rows 0..len-1 (kept packed)
        if self.speculative_tokens and self._speculative_step(active):
            return
        # Exactly the active rows: the compiled step's batch dimension is dynamic (fastpath), so 17 requests
        # cost 17 rows, not 32.
        rows = len(active)
        tokens = torch.tensor([[r.last_token] for _, r in active])
        positions = torch.tensor([[r.position] for _, r in active])
        # attention reads the slots up to the furthest active row, not the whole context
        window = max(r.position for _, r in active) + 1
        logits = self._do("step", tokens, positions, window, rows)
        self.steps += 1
        # Greedy rows whose logits nothing adjusts take one argmax over the whole batch (rows spread over the
        # threads: 64 rows of a 151552-word vocabulary cost ~25 ms one by one, ~1/20 of a 64-row step).
        plain = [r.params.temperature == 0 and not r.processors for _, r in active]
        best = greedy_tokens(logits).tolist() if any(plain) else []
        for (i, r), use_best in zip(active, plain):  # logits rows are the slots as they were during the step
            if r is self.chunking:  # its prompt is not all in yet: this row's result means nothing
                continue
            r.position += 1
            self._accept_or_fail(r, logits[i], best[i] if use_best else None)

    SPECULATION_ROWS = 16  # past this many rows a step is compute-bound: checking proposals would cost their rows

    def _speculative_step(self, active: list[tuple[int, Request]]) -> bool:
        """One step in which greedy requests (no processors) also check tokens proposed by prompt lookup
        (generation.speculate), each its own number, in one pass of the fused step (rows naming their cache row);
        every other request decodes one token in the same pass. False (nothing done) where it does not pay or the
        fused step cannot take it: the caller runs the plain step."""
        from ..generation.speculate import propose

        budget = self.SPECULATION_ROWS - len(active)
        plan = getattr(self.step_fn, "rows_step", None)
        if budget <= 0 or plan is None or self.tp is not None:
            return False
        rows, proposals = [], []
        for i, r in active:
            greedy = r.params.temperature == 0 and not r.processors and r is not self.chunking
            want = 0
            if greedy and budget > 0:
                want = min(budget, self.speculative_tokens if r.speculate < 0 else r.speculate,
                           r.params.max_tokens - r.generated - 1, self.context - r.position - 2)
            filled = len(r.prompt_ids) + r.generated
            found = propose(r.history[0, :filled].tolist(), want) if want > 0 else []
            budget -= len(found)
            proposals.append(found)
            rows += [(i, r.position + j, t) for j, t in enumerate([r.last_token] + found)]
        if not any(proposals):
            return False
        tokens = torch.tensor([[t] for _, _, t in rows])
        positions = torch.tensor([[p] for _, p, _ in rows])
        window = int(positions.max()) + 1
        logits = self._do("rows_step", tokens, positions, window, torch.tensor([i for i, _, _ in rows]))
        if logits is None:
            return False
        self.steps += 1
        first = 0
        for (i, r), found in zip(active, proposals):
            row_logits, first = logits[first:first + 1 + len(found)], first + 1 + len(found)
            if r is self.chunking:
                continue
            taken = 0
            for j in range(len(found) + 1):
                r.position += 1
                token = None if r.processors or r.params.temperature != 0 else int(row_logits[j].argmax())
                self._accept_or_fail(r, row_logits[j], token)
                if r.slot < 0 or j == len(found) or token != found[j]:
                    break  # finished, or the proposal was wrong: the token chosen instead is the next to feed
                taken += 1
            if found:
                r.speculate = min(self.speculative_tokens, taken + 1)
                self.speculated += len(found)
                self.speculation_accepted += taken
        return True

    def _op_rows_step(self, tokens, positions, window: int, cache_rows) -> torch.Tensor | None:
        rows = self.cache.rows(0, int(cache_rows.max()) + 1)
        mask = torch.ones(tokens.shape[0], window, dtype=torch.long, device=self.device)
        return self.step_fn.rows_step(self.model, tokens.to(self.device), positions.to(self.device), mask, rows,
                                      cache_rows.to(self.device))

    def _accept_or_fail(self, r: Request, logits: torch.Tensor, greedy_token: int | None = None) -> None:
        """One request's share of a step: what goes wrong in it (sampling, detokenising, its processors) ends
        that request with its own error; the other rows of the batch carry on."""
        try:
            self._accept(r, logits, greedy_token)
        except Exception as e:
            self._fail(r, e)

    def _fail(self, r: Request, e: Exception) -> None:
        message = str(e) if isinstance(e, ValueError) else f"internal error: {type(e).__name__}: {e}"
        r.emit(Event("error", error=message))
        r.cancelled.set()
        self._release(r, keep=False)

    def _accept(self, r: Request, logits: torch.Tensor, greedy_token: int | None = None) -> None:
        """Sample the request's next token from its logits (or take greedy_token, its argmax already found),
        stream its text, finish it when it stops."""
        raw = logits
        filled = len(r.prompt_ids) + r.generated  # tokens in the history so far
        if greedy_token is not None:
            token = greedy_token
        else:
            row = logits[None].float().cpu()  # a decode step's logits come in the model's dtype
            for process in r.processors:
                row = process(r.history[:, :filled], row)
            if r.params.temperature == 0:
                token = int(greedy_tokens(row)[0])
            else:
                token = int(sample_from_logits(row, r.generator))
        r.history[0, filled] = token
        r.last_token = token
        r.generated += 1
        if self.observer is not None:
            r.last_token_at = (self.observer.first_token(r.arrived, len(r.prompt_ids)) if r.generated == 1
                               else self.observer.token(r.last_token_at))
        if r.params.logprobs:
            logp = torch.log_softmax(raw.float().cpu(), -1)
            entry = {"token": self.tokenizer.decode([token]), "logprob": float(logp[token])}
            if r.params.top_logprobs:
                top = torch.topk(logp, r.params.top_logprobs)
                entry["top_logprobs"] = [{"token": self.tokenizer.decode([int(t)]), "logprob": float(v)}
                                         for v, t in zip(top.values, top.indices)]
            r.pending_logprobs.append(entry)
        piece, reason = r.text.add(token)  # the same text stream as generation.stream_text
        if reason is None and (r.generated >= r.params.max_tokens or r.position + 1 >= self.context):
            rest, reason = r.text.finish()
            piece, reason = piece + rest, reason or "length"
        self._send(r, piece)
        if reason is not None:
            self._finish(r, reason)

    def _send(self, r: Request, piece: str) -> None:
        if piece or r.pending_logprobs:
            r.emit(Event("text", text=piece, token_logprobs=r.pending_logprobs))
            r.pending_logprobs = []

    def _finish(self, r: Request, reason: str) -> None:
        r.emit(Event("done", finish_reason=reason, prompt_tokens=len(r.prompt_ids), completion_tokens=r.generated,
                     cached_tokens=r.cached_tokens))
        if self.observer is not None:
            self.observer.finished(r.arrived, reason)
        self._release(r)


def default_max_tokens(engine: Engine, prompt_tokens: int) -> int:
    return max(1, min(4096, engine.context - prompt_tokens - 1))

