"""Continuous batching over a paged KV cache: one thread owns the model and a pool of KV blocks
(cache.PagedKVCache, serve.blocks.BlockPool) sized by a memory budget, and runs up to `max_num_seqs` requests.

Every step decodes one token for every running request together; waiting requests are admitted while the pool has
blocks for their prompts (admission by blocks, not by slots: a short chat takes a few blocks, a 100K-token document
takes its own) and prefilled between steps, several in one forward pass (up to `prefill_tokens` padded tokens, so
a burst of arrivals costs a few large matrix products instead of many small ones and running streams pause only
briefly); a finished or cancelled request leaves at once and its blocks go back to the pool. While streams decode,
a pass takes only what this machine prefills in `prefill_seconds`; a prompt longer than that goes in chunks, one per
loop turn between decode steps. When a decode step needs a block and the pool has none, the youngest running
request is preempted: its blocks are released and it goes back to the front of the queue, to be prefilled again
(its prompt and what it generated so far) when blocks free up; it then resumes where it stopped, with the same
output: no token is sampled twice, and its random generator has not moved.
Each request keeps its own sampling parameters and random generator, so a seed gives the same text whether
the request runs alone or in a full batch.

Automatic prefix caching (on by default): full blocks are named by a hash chained over their tokens and prefix
(serve.blocks), so a new request reuses the blocks of the longest prefix of its prompt that any request left in the
pool, running or finished (a system prompt shared by 100 requests, a chat client resending its history), and
prefills only the rest; blocks nobody holds stay cached until the pool needs them, least recently used first.

Under tensor parallelism (`torchrun ... glmtorch serve`), rank 0 schedules and serves HTTP; every operation on the
model goes through `_do`, which first sends it to the other ranks (with the block tables it uses), where
`follow()` runs the same operation on their shard of the pool (the collectives inside the forward pass then meet).
Only rank 0 samples and owns the block pool's bookkeeping: the logits are gathered on every rank, and the tokens
travel in the next operation.

Where the loop runs matters on a CPU: torch's OpenMP threads answer a parallel region started from the process's
main thread in ~9 us, from any other thread in ~70 us (measured with 2 threads, AMX Xeon; libgomp keeps only the
main thread's team spinning), which made a 64-row step of "small" bf16 135 ms instead of 108 ms. So `glmtorch
serve` runs the loop in the main thread (`Engine(..., thread=False)`, then `run()`) and the HTTP server beside
it; embedded uses (tests, notebooks) get their own thread by default.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from array import array
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..fastpath import FusedDecodeStep, compiled_decode_step
from ..generation.config import (SEED_MAX, GenerationConfig, SamplingValueError, check_logit_bias,
                                check_sampling_value)
from ..generation.constrain import Constraint
from ..generation.processors import LogitBias, MinTokens, PresenceFrequencyPenalty, make_processors
from ..generation.sampling import greedy_tokens, sample_from_logits
from ..generation.streaming import TextStream
from .blocks import BlockPool, chain_hashes


BLOCK_SIZE = 16  # tokens per KV block (vLLM's default): the unit of allocation and of prefix sharing
MAX_NUM_SEQS = 256  # requests running at once by default (vLLM's default), if the pool holds them
KV_SHARE_CPU, KV_SHARE_GPU = 0.25, 0.8  # of the memory free after loading, what the KV pool takes by default


def arrival_wait_from_env() -> float:
    """How long an idle engine waits for arriving requests (Engine._let_arrivals_in): GLMTORCH_ARRIVAL_WAIT
    seconds, 0.05 by default, 0 to never wait."""
    text = os.environ.get("GLMTORCH_ARRIVAL_WAIT", "").strip()
    if not text:
        return 0.05
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds <= 10:
        raise ValueError(f"GLMTORCH_ARRIVAL_WAIT must be a number of seconds from 0 to 10 (0: never wait for "
                         f"arriving requests), got {text!r}")
    return seconds


def request_processors(params: SamplingParams, prompt_length: int, stop_ids=()) -> list:
    """A request's logits processors, in vLLM's order: its constraint's mask first (so that top-k / top-p pick
    among the tokens it allows), then min_tokens (no stop token yet), logit_bias, the presence / frequency
    penalties, and generate()'s processors (repetition penalty, temperature, top-k, top-p, min-p)."""
    processors = [params.constraint.processor()] if params.constraint else []
    if params.min_tokens and not params.ignore_eos:
        processors.append(MinTokens(stop_ids, params.min_tokens, prompt_length))
    if params.logit_bias:
        processors.append(LogitBias(params.logit_bias))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty, prompt_length))
    return processors + make_processors(params.generation_config())


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


# The sampling fields bounded as generate()'s are (generation.config.SAMPLING_BOUNDS), each with its bound's name.
BOUNDED_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                  "frequency_penalty": "frequency_penalty", "max_tokens": "max_new_tokens",
                  "min_tokens": "min_new_tokens", "seed": "seed"}
TOP_LOGPROBS_MAX = 20  # OpenAI's


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's, on the reply's tokens so far
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # vLLM's: no stop token (end of turn / text) before the reply has this many tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # keep going past end-of-turn / end-of-text tokens (benchmarks)
    constraint: object = None  # a compiled generation.constrain.Constraint: the output must follow it
    # completions of each prompt that glmtorch.LLM makes (vLLM's n; completion i is seeded seed + i): each is one
    # request, which the engine runs as one sequence (the server takes a request body's n the same way)
    n: int = 1

    def checked(self, vocab_size: int) -> "SamplingParams":
        """A copy with every field checked: the one place these rules live (Engine.submit applies them to every
        request, whoever builds it: glmtorch.LLM, the server, a caller of its own). SamplingValueError names the
        first bad field. A lone stop string becomes a list of one (vLLM takes either)."""
        for name, bound in BOUNDED_FIELDS.items():
            value = getattr(self, name)
            if value is not None or name != "seed":  # only the seed may be left unset
                check_sampling_value(bound, value, shown=name)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise SamplingValueError("n", f"n={self.n!r}: must be an integer >= 1")
        if self.seed is not None and self.seed + self.n - 1 > SEED_MAX:  # completion i has seed + i
            raise SamplingValueError("seed", f"seed={self.seed} leaves no room for n={self.n} completions "
                                             f"(seed + n - 1 must be <= {SEED_MAX})")
        if self.min_tokens > self.max_tokens:
            raise SamplingValueError("min_tokens", f"min_tokens={self.min_tokens} is more than "
                                                   f"max_tokens={self.max_tokens}")
        for name in ("logprobs", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingValueError(name, f"{name}={getattr(self, name)!r}: must be true or false")
        top = self.top_logprobs
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= TOP_LOGPROBS_MAX:
            raise SamplingValueError("top_logprobs", f"top_logprobs={top!r}: must be an integer in "
                                                     f"[0, {TOP_LOGPROBS_MAX}]")
        if top and not self.logprobs:  # as OpenAI answers it: asked-for output is never silently left out
            raise SamplingValueError("top_logprobs", f"top_logprobs={top} needs logprobs set true")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise SamplingValueError("stop", "stop must be a non-empty string or a list of them")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise SamplingValueError("constraint", "constraint must be a compiled glmtorch.generation.constrain."
                                                   f"Constraint or None, got {type(self.constraint).__name__}")
        return replace(self, stop=list(stop), logit_bias=check_logit_bias(self.logit_bias, vocab_size))

    def for_choice(self, k: int) -> "SamplingParams":
        """The parameters of completion k of n (LLM.generate, the server's choices): seeded seed + k, one sequence."""
        return self if k == 0 or self.seed is None else replace(self, seed=self.seed + k, n=1)

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
    completion_tokens: int = 0  # generated so far (a text event) or in all (done)
    cached_tokens: int = 0  # of the prompt tokens, how many came from the prefix cache
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-side state
    row: int = -1  # its row of the engine's block tables while it runs; -1 when waiting or done
    blocks: list[int] = field(default_factory=list)  # its KV blocks, in order
    # the prefix-cache names of its full blocks so far (while waiting: of its prompt's, to look them up)
    names: list[bytes] = field(default_factory=list)
    position: int = 0  # tokens whose keys and values its blocks hold
    last_token: int = 0
    generated: int = 0
    tokens: list[int] = field(default_factory=list)  # its prompt and what it has generated so far
    processors: list = field(default_factory=list)
    generator: torch.Generator | None = None
    text: TextStream | None = None
    pending_logprobs: list[dict] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0  # when its latest token was made (inter-token latency)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache, not a prefill
    preempted: int = 0  # times it gave its blocks up to older requests
    speculate: int = -1  # proposals to make next step (speculative decoding; -1: not decided yet)
    _history: torch.Tensor | None = field(default=None, repr=False)
    _synced: int = 0  # tokens copied into _history so far

    @property
    def history(self) -> torch.Tensor:
        """(1, prompt + max_tokens) tensor whose first len(tokens) entries are its tokens, for logits processors
        (which take a tensor). The tokens list is what a step appends to (a tensor write was ~3 us a token);
        reading this copies in only the tokens added since the last read."""
        if self._history is None:
            self._history = torch.empty(1, len(self.prompt_ids) + self.params.max_tokens, dtype=torch.long)
        if self._synced < len(self.tokens):
            self._history[0, self._synced:len(self.tokens)] = torch.tensor(self.tokens[self._synced:])
            self._synced = len(self.tokens)
        return self._history


def default_kv_cache_memory(model) -> int:
    """Bytes for the KV block pool when none are asked for: a quarter of the memory free after loading on a CPU
    (taken only as blocks are written, see cache.PagedKVCache), 80% of the free device memory on a GPU, 4 GiB
    where free memory is unknown."""
    from ..device import available_memory

    free = available_memory(model.device)
    if free is None:
        return 4 << 30
    return int(free * (KV_SHARE_CPU if model.device.type == "cpu" else KV_SHARE_GPU))


class Engine:
    def __init__(self, model, tokenizer, max_num_seqs: int = MAX_NUM_SEQS, max_queue: int = 64,
                 max_context: int | None = None, stop_ids: set[int] | None = None, prefill_tokens: int = 2048,
                 thread: bool = True, prefill_seconds: float = 1.0, prefix_caching: bool = True,
                 speculative_tokens: int = 0, kv_cache_memory: int | None = None,
                 block_size: int = BLOCK_SIZE) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
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
        self.speculative_tokens = speculative_tokens  # prompt lookup for greedy requests while few decode
        self.speculated = self.speculation_accepted = 0
        self._make_pool(kv_cache_memory, block_size, prefix_caching)
        self.prefix_queries = 0  # prompt tokens admitted
        self.prefix_hits = 0  # of those, tokens whose keys and values came from the prefix cache
        self.preemptions = 0
        self.running: list[Request] = []  # in the order they were admitted: the youngest is preempted first
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.running_loop = True
        self.step_fn = compiled_decode_step(model)
        self.device = model.device
        self.tp = getattr(model, "tensor_parallel", None)  # a TensorParallel when the model is a shard
        self.steps = 0  # decode steps
        # requests a front end has begun receiving (headers read) and not yet submitted or refused: the server's
        # HTTP side counts them (app.CountArrivals), so that an idle engine lets a burst arrive (see _loop)
        self.arriving = 0
        self.arrival_wait = arrival_wait_from_env()
        self.prefill_passes = 0  # forward passes that prefilled prompts (several requests each under load)
        self.outbox: list | None = None  # events held until the pass that made them ends (_holding_events)
        self.logits: torch.Tensor | None = None  # the fused step's logits buffer (_logits_buffer)
        self.greedy_ids: torch.Tensor | None = None  # where the fused step puts each row's greedy token (_op_step)
        self.thread = None
        if thread:
            self.thread = threading.Thread(target=self.run, name="glmtorch-engine", daemon=True)
            self.thread.start()

    def _make_pool(self, kv_cache_memory: int | None, block_size: int, prefix_caching: bool) -> None:
        """The block pool: as many blocks as `kv_cache_memory` bytes hold (never more than max_num_seqs full
        contexts need), plus the reserved block 0. A pool smaller than one full context shortens the context:
        a request admitted alone must always fit."""
        per_block = self.model.kv_block_bytes(block_size)
        budget = kv_cache_memory if kv_cache_memory is not None else default_kv_cache_memory(self.model)
        blocks = budget // per_block
        if blocks < 2:
            raise ValueError(f"--kv-cache-memory {budget} bytes holds no more than one block of {block_size} "
                             f"tokens ({per_block} bytes each); give the KV cache more memory")
        per_sequence = -(-(self.context + self.speculative_tokens + 1) // block_size)
        blocks = min(blocks, self.max_num_seqs * per_sequence)
        if blocks * block_size < self.context:
            self.context = blocks * block_size
            warnings.warn(f"the KV cache holds {blocks * block_size} tokens, fewer than the model's context: "
                          f"requests are limited to {self.context} tokens (raise --kv-cache-memory, or lower "
                          "--max-context, to change it)", stacklevel=3)
        self.block_size = block_size
        self.cache = self.model.new_paged_cache(blocks + 1, block_size)
        self.pool = BlockPool(blocks + 1, block_size, prefix_caching)
        self.prefix_caching = prefix_caching
        # each running request's block table (a row of it); entries past its blocks name block 0. As wide as the
        # longest request so far needs (doubled as they grow): 256 rows of a 128K context would be 16 MB at once.
        self.tables = torch.zeros(self.max_num_seqs, 64, dtype=torch.long)
        self.free_rows = list(range(self.max_num_seqs - 1, -1, -1))
        # admit only while this many blocks stay free (vLLM's 1% watermark): decoding streams need new blocks
        self.watermark = max(1, blocks // 100)

    # -- the outside ---------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; SamplingValueError where its parameters break a rule (SamplingParams.checked),
        QueueFull where the queue is full."""
        request.params = request.params.checked(self.model.config.vocab_size)
        with self.cond:
            if not self.running_loop:
                raise QueueFull("the server is shutting down")
            # Count requests not yet admitted too: the engine thread may not have taken them yet.
            if self.active + len(self.waiting) >= self.max_num_seqs + self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            request.tokens = list(request.prompt_ids)
            request.processors = request_processors(request.params, len(request.prompt_ids), self.stop_ids)
            request.generator = torch.Generator().manual_seed(
                request.params.seed if request.params.seed is not None else int.from_bytes(os.urandom(6), "little"))
            request.text = TextStream(self.tokenizer, request.params.stop, self.stop_ids, request.params.ignore_eos)
            self.waiting.append(request)
            # Wake an idle engine (its first request: it then lets the others arrive), or one letting arrivals in
            # when this was the last: not at every request of a burst, nor every millisecond (it polled before),
            # each wake-up a turn for the GIL and the lock taken from the thread that submits the rest.
            if len(self.waiting) == 1 or not self.arriving:
                self.cond.notify()

    def end_arrival(self) -> None:
        """A request stopped arriving without being submitted (refused): an engine letting arrivals in goes on
        once none is left."""
        with self.cond:
            self.arriving -= 1
            if not self.arriving:
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
        self.running_loop = False

    def _end_all(self) -> None:
        with self.cond:
            self.chunking = None
            for r in list(self.waiting) + list(self.running):
                r.emit(Event("error", error="the server is shutting down"))
                self._release(r)
            self.waiting.clear()

    @property
    def active(self) -> int:
        return len(self.running)

    def cache_usage(self) -> float:
        """Fraction of the KV pool's blocks held by running requests."""
        return self.pool.usage()

    def prefix_cache_stats(self) -> dict:
        """Prompt tokens admitted, and how many of them the prefix cache supplied (vLLM's queries / hits)."""
        return {"queries": self.prefix_queries, "hits": self.prefix_hits}

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
                while self.running_loop and not self.waiting and not self.running:
                    if until_idle:
                        return
                    self.cond.wait(timeout=0.25)  # a timeout: request_stop() does not notify
                if not self.running_loop:
                    break
                self._let_arrivals_in()
                # a prompt being prefilled in chunks goes on first; others wait behind it, as in a queue
                admitted = [] if self.chunking is not None else self._take_waiting()
            try:
                with self._holding_events():
                    if self.chunking is not None:
                        self._prefill_chunk(self.chunking)
                    elif len(admitted) == 1 and \
                            len(self._feed(admitted[0])) - admitted[0].position > self._prefill_budget(admitted):
                        self.chunking = admitted[0]
                        self._prefill_chunk(self.chunking)
                    elif admitted:
                        self._prefill(admitted)
                if admitted and self.chunking is None:
                    # Let the server's event loop write the first tokens now, before the decode step that follows
                    # takes both cores (and, where it is a compiled graph, the GIL) for a whole step.
                    time.sleep(0.001)
                self._drop_cancelled()
                if any(r is not self.chunking for r in self.running):
                    with self._holding_events():
                        self._decode_step()
            except Exception as e:  # the batched forward itself failed: every row in it is lost, nobody hangs
                with self.cond:
                    for r in list(self.running):
                        self._fail(r, e)
        self._end_all()

    def _let_arrivals_in(self) -> None:
        """With nothing decoding and requests still arriving (their headers read, their bodies being parsed and
        tokenized by the HTTP side), wait for them, at most `arrival_wait` seconds, so that a burst is prefilled in
        one pass: begun with the first request alone, the engine ran four passes and three thin decode steps in
        between while the HTTP thread, sharing the cores and the GIL, took the rest in. A lone request is never
        held (its own arrival ends before it is submitted); a client trickling its body holds an idle engine for
        at most `arrival_wait`. Called with self.cond held (its wait lets submit() in; the last arrival's submit(),
        or end_arrival(), wakes it)."""
        if self.running or self.chunking is not None or not self.arriving:
            return
        deadline = time.monotonic() + self.arrival_wait
        while self.arriving > 0 and self.running_loop and (left := deadline - time.monotonic()) > 0:
            self.cond.wait(timeout=left)

    @staticmethod
    def _feed(r: Request) -> list[int]:
        """The tokens a request's blocks must hold before it decodes: its prompt, or, resuming after preemption,
        its prompt and all it generated but the last token (which the next decode step feeds)."""
        if r.generated == 0:
            return r.prompt_ids
        return r.tokens[:-1]

    def _take_waiting(self) -> list[Request]:
        """Admit waiting requests while the pool has blocks for their prompts (keeping `watermark` free for the
        running ones' next tokens), at most max_num_seqs running, as many as fit in one prefill pass:
        `prefill_tokens` padded tokens (fewer while others decode, see prefill_seconds), and always at least one."""
        out: list[Request] = []
        longest = 0
        budget = self._prefill_budget()
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.cancelled.is_set():
                self.waiting.popleft()
                continue
            feed = self._feed(request)
            # the longest cached prefix, leaving at least one token to prefill (its logits give the next token);
            # the names are kept on the request, not hashed again each loop turn while it waits for blocks
            if self.prefix_caching and len(request.names) != (len(feed) - 1) // self.block_size:
                request.names = chain_hashes(feed[:-1], self.block_size)
            cached = self.pool.cached_prefix(request.names)
            rest = len(feed) - len(cached) * self.block_size
            if out and max(longest, rest) * (len(out) + 1) > budget:
                break
            new = -(-len(feed) // self.block_size) - len(cached)
            if not self.pool.can_take(cached, new, self.watermark if self.running else 0):
                break
            self.waiting.popleft()
            longest = max(longest, rest)
            self._admit(request, len(feed), cached)
            out.append(request)
        return out

    def _admit(self, r: Request, fed: int, cached: list[int]) -> None:
        """Give `r` a block-table row, the `cached` blocks of its prompt's prefix (found among r.names) and fresh
        blocks for the rest of its `fed` tokens."""
        self.pool.take_cached(cached, len(r.names))
        r.blocks, r.names = list(cached), r.names[:len(cached)]  # names beyond: given as those blocks fill
        r.row = self.free_rows.pop()
        self._widen_tables(len(cached))
        self.tables[r.row, :len(cached)] = torch.tensor(cached, dtype=torch.long)
        r.position = len(cached) * self.block_size
        self._grow(r, fed)
        if r.generated == 0:  # not a preempted request coming back
            r.cached_tokens = r.position
            self.prefix_queries += len(r.prompt_ids)
            self.prefix_hits += r.position
        self.running.append(r)

    def _grow(self, r: Request, slots: int) -> bool:
        """Give `r` blocks until they hold `slots` token slots; False (and what it got) when the pool runs out."""
        while len(r.blocks) * self.block_size < slots:
            block = self.pool.allocate()
            if block is None:
                return False
            self._widen_tables(len(r.blocks) + 1)
            self.tables[r.row, len(r.blocks)] = block
            r.blocks.append(block)
        return True

    def _widen_tables(self, blocks: int) -> None:
        """Make the block tables at least `blocks` wide (doubling)."""
        while self.tables.shape[1] < blocks:
            self.tables = torch.cat([self.tables, torch.zeros_like(self.tables)], dim=1)

    def _name_full_blocks(self, r: Request) -> None:
        """Name the blocks `r` has filled since the last call, so that later requests can share them."""
        full = r.position // self.block_size
        if full > len(r.names) and self.prefix_caching:
            tokens = r.tokens[len(r.names) * self.block_size:full * self.block_size]
            for block, name in zip(r.blocks[len(r.names):full],
                                   chain_hashes(tokens, self.block_size, r.names[-1] if r.names else b"")):
                self.pool.name(block, name)
                r.names.append(name)

    def _release(self, r: Request) -> None:
        """r leaves the running set; its blocks go back to the pool (named ones stay cached until needed: what a
        failed pass may have half written is past its position, in blocks never named)."""
        if r.row < 0:
            return
        self.pool.release(r.blocks)
        self.tables[r.row, :len(r.blocks)] = 0
        self.free_rows.append(r.row)
        r.row, r.blocks, r.names = -1, [], []
        if r in self.running:
            self.running.remove(r)
        if self.chunking is r:
            self.chunking = None

    def _preempt(self, r: Request) -> None:
        """Free r's blocks for older requests; it waits at the front of the queue and is prefilled again later."""
        self._release(r)
        r.position = 0
        r.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    def _prefill_budget(self, prefilling: list[Request] = ()) -> int:
        """Prompt tokens one prefill pass may take: `prefill_tokens`, and while others (requests not in
        `prefilling`) decode only what the measured rate prefills in `prefill_seconds` (at least 16)."""
        others = any(r not in prefilling for r in self.running)
        if self.prefill_rate is not None and others:
            return max(16, min(self.prefill_tokens, int(self.prefill_rate * self.prefill_seconds)))
        return self.prefill_tokens

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.running if r.cancelled.is_set()]:
            self._release(r)

    def _table(self, requests: list[Request], slots: int) -> torch.Tensor:
        """The block-table rows of `requests` (one per request, repeated as given), covering `slots` slots."""
        return self.tables[:, :-(-slots // self.block_size)].index_select(0, int64s([r.row for r in requests]))

    def _prefill(self, requests: list[Request]) -> None:
        """Prompts right-padded into one batch; each starts after the prefix its blocks already hold
        (request.position, from the prefix cache). Padding writes keys past each prompt's end, into its last block
        or block 0; no query ever sees them (a query at position p sees keys <= p), and decoding overwrites them."""
        feeds = [self._feed(r) for r in requests]
        starts = torch.tensor([r.position for r in requests])
        lengths = torch.tensor([len(f) - r.position for f, r in zip(feeds, requests)])
        T = int(lengths.max())
        ids = torch.zeros(len(requests), T, dtype=torch.long)
        for i, (f, r) in enumerate(zip(feeds, requests)):
            ids[i, :lengths[i]] = torch.tensor(f[r.position:])
        # No padding mask: the causal rule alone keeps every real query on real keys (a padding query's output is
        # never read). Without cached prefixes, one set of positions for every row: the plain causal fast path (SDPA
        # skips the blocks above the diagonal, and the keys are the pass's own, not gathered from the pool).
        positions = torch.arange(T) if bool((starts == 0).all()) else starts[:, None] + torch.arange(T)
        length = int(starts.max()) + T
        self.prefill_passes += 1
        start = time.perf_counter()
        # the prompts attend to their prefixes and themselves only
        logits = self._do("prefill", ids, lengths, None, self._table(requests, length), length, positions)
        self._note_prefill_rate(T * len(requests), time.perf_counter() - start)
        for f, r, row_logits in zip(feeds, requests, logits):
            self._prefilled(r, len(f), row_logits)

    def _prefilled(self, r: Request, position: int, logits: torch.Tensor) -> None:
        """r's blocks hold its whole feed: its first token comes from the logits (a preempted request already has
        its next token, and draws nothing: its output is as if it had never left)."""
        r.position = position
        self._name_full_blocks(r)
        if r.generated == 0:
            self._accept_or_fail(r, logits)

    def _prefill_chunk(self, r: Request) -> None:
        """The next chunk of a prompt longer than one pass, after the chunks before it: every other stream waits
        one chunk, not the whole prompt (a 30,000-token prompt is ~40 s of fp32 prefill on two cores). Until its
        last chunk the request sits out of the decode steps."""
        if r.cancelled.is_set() or r.row < 0:
            self.chunking = None
            return
        feed = self._feed(r)
        start = r.position  # the prompt tokens in its blocks so far
        end = min(len(feed), start + self._prefill_budget([r]))
        self.prefill_passes += 1
        began = time.perf_counter()
        # this chunk attends to the chunks before it and to itself
        logits = self._do("prefill", torch.tensor([feed[start:end]]), torch.tensor([end - start]),
                          torch.ones(1, end, dtype=torch.long), self._table([r], end), end, torch.arange(start, end))
        self._note_prefill_rate(end - start, time.perf_counter() - began)
        r.position = end
        self._name_full_blocks(r)
        if end == len(feed):
            self.chunking = None
            self._prefilled(r, end, logits[0])

    def _note_prefill_rate(self, tokens: int, seconds: float) -> None:
        if tokens >= 256:  # a pass big enough to time: small ones are mostly fixed costs
            rate = tokens / seconds
            self.prefill_rate = rate if self.prefill_rate is None else 0.5 * (self.prefill_rate + rate)

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

    def _op_prefill(self, ids, lengths, real, table, length: int, positions) -> torch.Tensor:
        view = self.cache.view(table.to(self.device), length)
        return self.model.last_token_logits(ids.to(self.device), lengths, None if real is None else
                                            real.to(self.device), view, positions.to(self.device))

    def _op_step(self, tokens, positions, window: int, table, greedy: bool = False) -> torch.Tensor:
        """The step's logits; with `greedy`, each row's most likely token goes to self.greedy_ids too (where the
        fused step takes it; _best_ids)."""
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        mask = torch.ones(tokens.shape[0], window, dtype=torch.long, device=self.device)
        view = self.cache.view(table.to(self.device), window)
        if isinstance(self.step_fn, FusedDecodeStep):
            rows = tokens.shape[0]
            if greedy and (self.greedy_ids is None or self.greedy_ids.shape[0] < rows):
                self.greedy_ids = torch.empty(max(rows, 8), dtype=torch.long)
            return self.step_fn(self.model, tokens, positions, positions, mask, view,
                                logits=self._logits_buffer(rows), greedy=self.greedy_ids[:rows] if greedy else None)
        return self.step_fn(self.model, tokens, positions, positions, mask, view)

    def _best_ids(self, logits: torch.Tensor, rows: int) -> list[int]:
        """Each row's most likely token of a step run with greedy=True."""
        if isinstance(self.step_fn, FusedDecodeStep):
            return self.greedy_ids[:rows].tolist()
        return greedy_tokens(logits).tolist()

    def _op_rows_step(self, tokens, positions, window: int, table) -> torch.Tensor | None:
        mask = torch.ones(tokens.shape[0], window, dtype=torch.long, device=self.device)
        return self.step_fn.rows_step(self.model, tokens.to(self.device), positions.to(self.device), mask,
                                      self.cache.view(table.to(self.device), window), None,
                                      logits=self._logits_buffer(tokens.shape[0]))

    def _logits_buffer(self, rows: int) -> torch.Tensor:
        """Where the fused CPU step writes a step's logits: one buffer, reused while the step is no larger. A fresh
        (64, 151552) fp32 tensor each step is 39 MB that glibc maps anew (past its 32 MB reuse limit) and the step
        page-faults in: ~13 ms of a ~140 ms 64-row step of "small" on two cores. A step's logits are read before
        the next step runs (sampling, streaming), so overwriting them then is safe."""
        vocab = self.model.lm_head.out_features
        if self.logits is None or self.logits.shape[0] < rows:
            self.logits = torch.empty(max(rows, 8), vocab, dtype=torch.float32)
        return self.logits[:rows]

    def _op_stop(self) -> None:
        """Nothing here: followers leave follow() on it."""

    # -- decoding ------------------------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        # every running request gets a block for the token it writes now; where the pool has none left, the
        # youngest requests give theirs up (oldest first served: the ones closest to finishing keep going)
        size = self.block_size
        for r in list(self.running):
            if r is self.chunking or r.position < len(r.blocks) * size:  # its last block has room (15 steps in 16)
                continue
            while r.row >= 0 and not self._grow(r, r.position + 1):
                self._preempt(self.running[-1])
        active = [r for r in self.running if r is not self.chunking]
        if not active:
            return
        if self.speculative_tokens and self._speculative_step(active):
            return
        tokens = int64s([r.last_token for r in active]).view(-1, 1)
        positions = int64s([r.position for r in active]).view(-1, 1)
        # attention reads the slots up to the furthest row, not the whole context
        window = max(r.position for r in active) + 1
        # Greedy rows whose logits nothing adjusts take one argmax over the whole batch (rows spread over the
        # threads: 64 rows of a 151552-word vocabulary cost ~25 ms one by one, ~1/20 of a 64-row step), inside
        # the fused step where it runs the LM head (greedy_ids).
        plain = [r.params.temperature == 0 and not r.processors for r in active]
        greedy = any(plain)
        logits = self._do("step", tokens, positions, window, self._table(active, window), greedy)
        self.steps += 1
        best = self._best_ids(logits, len(active)) if greedy else []
        for i, (r, use_best) in enumerate(zip(active, plain)):
            r.position += 1
            if r.position % size == 0:  # a block just filled: named for later requests to share
                self._name_full_blocks(r)
            self._accept_or_fail(r, logits, best[i] if use_best else None, index=i)

    SPECULATION_ROWS = 16  # past this many rows a step is compute-bound: checking proposals would cost their rows

    def _speculative_step(self, active: list[Request]) -> bool:
        """One step in which greedy requests (no processors) also check tokens proposed by prompt lookup
        (generation.speculate), each its own number, in one pass of the fused step (their rows share the request's
        block table); every other request decodes one token in the same pass. Proposals take blocks only while the
        pool has them free. False (nothing done) where it does not pay or the fused step cannot take it: the
        caller runs the plain step."""
        from ..generation.speculate import propose

        budget = self.SPECULATION_ROWS - len(active)
        plan = getattr(self.step_fn, "rows_step", None)
        if budget <= 0 or plan is None or self.tp is not None:
            return False
        rows, proposals = [], []
        for r in active:
            want = 0
            if r.params.temperature == 0 and not r.processors and budget > 0:
                want = min(budget, self.speculative_tokens if r.speculate < 0 else r.speculate,
                           r.params.max_tokens - r.generated - 1, self.context - r.position - 2)
            found = propose(r.tokens, want) if want > 0 else []
            self._grow(r, r.position + 1 + len(found))  # as far as free blocks go: no preemption for a guess
            found = found[:len(r.blocks) * self.block_size - r.position - 1]
            budget -= len(found)
            proposals.append(found)
            rows += [(r, r.position + j, t) for j, t in enumerate([r.last_token] + found)]
        if not any(proposals):
            return False
        tokens = torch.tensor([[t] for _, _, t in rows])
        positions = torch.tensor([[p] for _, p, _ in rows])
        window = int(positions.max()) + 1
        logits = self._do("rows_step", tokens, positions, window, self._table([r for r, _, _ in rows], window))
        if logits is None:
            return False
        self.steps += 1
        first = 0
        for r, found in zip(active, proposals):
            row_logits, first = logits[first:first + 1 + len(found)], first + 1 + len(found)
            taken = 0
            for j in range(len(found) + 1):
                r.position += 1
                self._name_full_blocks(r)
                token = None if r.processors or r.params.temperature != 0 else int(row_logits[j].argmax())
                self._accept_or_fail(r, row_logits[j], token)
                if r.row < 0 or j == len(found) or token != found[j]:
                    break  # finished, or the proposal was wrong: the token chosen instead is the next to feed
                taken += 1
            if found:
                r.speculate = min(self.speculative_tokens, taken + 1)
                self.speculated += len(found)
                self.speculation_accepted += taken
        return True

    def _accept_or_fail(self, r: Request, logits: torch.Tensor, greedy_token: int | None = None,
                        index: int | None = None) -> None:
        """One request's share of a step: what goes wrong in it (sampling, detokenising, its processors) ends
        that request with its own error; the other rows of the batch carry on."""
        try:
            self._accept(r, logits, greedy_token, index)
        except Exception as e:
            self._fail(r, e)

    def _fail(self, r: Request, e: Exception) -> None:
        message = str(e) if isinstance(e, ValueError) else f"internal error: {type(e).__name__}: {e}"
        self._emit(r, Event("error", error=message))
        r.cancelled.set()
        self._release(r)

    def _accept(self, r: Request, logits: torch.Tensor, greedy_token: int | None = None,
                index: int | None = None) -> None:
        """Sample the request's next token from its logits (or take greedy_token, its argmax already found),
        stream its text, finish it when it stops. `logits`: the request's (V,), or a step's (B, V) with `index`
        naming its row, taken only where something reads it (a view per row of a 64-row step: ~0.1 ms, AMD EPYC)."""
        if index is not None and (greedy_token is None or r.params.logprobs):
            logits = logits[index]
        raw = logits
        if greedy_token is not None:
            token = greedy_token
        else:
            row = logits[None].float().cpu()  # a decode step's logits come in the model's dtype
            for process in r.processors:
                row = process(r.history[:, :len(r.tokens)], row)
            if r.params.temperature == 0:
                token = int(greedy_tokens(row)[0])
            else:
                token = int(sample_from_logits(row, r.generator))
        r.tokens.append(token)
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

    def _emit(self, r: Request, event: Event) -> None:
        if self.outbox is not None:
            self.outbox.append((r.emit, event))
        else:
            r.emit(event)

    @contextlib.contextmanager
    def _holding_events(self):
        """A pass's events go out together when it ends, not one by one from inside its loop over the rows: each
        first event woke the server's event loop, whose Python then took turns for the GIL with the rest of this
        loop (64 rows of the demo model: ~4 ms of bookkeeping a step served, ~1.2 ms alone)."""
        self.outbox = []
        try:
            yield
        finally:
            held, self.outbox = self.outbox, None
            for emit, event in held:
                emit(event)

    def _send(self, r: Request, piece: str) -> None:
        if piece or r.pending_logprobs:
            self._emit(r, Event("text", text=piece, token_logprobs=r.pending_logprobs, completion_tokens=r.generated,
                                cached_tokens=r.cached_tokens))
            r.pending_logprobs = []

    def _finish(self, r: Request, reason: str) -> None:
        self._emit(r, Event("done", finish_reason=reason, prompt_tokens=len(r.prompt_ids),
                            completion_tokens=r.generated, cached_tokens=r.cached_tokens))
        if self.observer is not None:
            self.observer.finished(r.arrived, reason)
        self._release(r)


def int64s(values: list[int]) -> torch.Tensor:
    """A 1-D int64 tensor of Python ints through an array's buffer: a step's token, position and block-table row
    lists (torch.tensor of 64 one-element lists took ~37 us, ~100 just after a step had filled the caches; this ~4)."""
    return torch.frombuffer(array("q", values), dtype=torch.long) if values else torch.empty(0, dtype=torch.long)


def default_max_tokens(engine: Engine, prompt_tokens: int) -> int:
    return max(1, min(4096, engine.context - prompt_tokens - 1))

