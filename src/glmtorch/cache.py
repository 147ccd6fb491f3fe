"""KV caches. The cache owns the key/value layout; layers only call `cache.update(layer_idx, k, v,
cache_position)` and attend over what it returns.

Convention shared by every cache: key slot j holds the token at absolute position j of its row, so one
rule builds every mask (`make_attention_mask`): a query at position p sees the keys j <= p that are not
padding. `cache_position` is (T,) when all rows advance together, or (B, T) when each row has its own
length (continuous batching).

- `DynamicCache` grows by concatenation: simple, no size to choose; the default of `forward`.
- `StaticCache` preallocates (layers, B, KV, max_length, D) buffers and writes in place, so shapes never change
  and a compiled decode step never recompiles; per-row lengths live in `seq_lengths`, advanced in one place
  (`advance`) after each forward, never inside a layer.
- `PagedKVCache` is a pool of fixed-size blocks shared by every sequence of a server (vLLM's PagedAttention):
  a sequence holds the blocks its block table names, as many as its length needs, so memory goes to the tokens
  that exist, and a block of a shared prompt prefix can sit in many tables. Who owns which block is the
  engine's business (serve.blocks); the cache only reads and writes through the table it is given.
"""

from __future__ import annotations

import functools
import os

import torch

from . import dispatch, kernels
from .device import check_allocation
from .dispatch import ATTENTION_READS
from .hugepages import zeros_on_demand


def make_attention_mask(
    cache_position: torch.Tensor,
    kv_length: int,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Boolean (B or 1, 1, T, S) mask: True where query (b, t) may attend key slot j.

    attention_mask: optional (B, <=S) 0/1 padding mask over absolute positions; slots past its end count as
    real (the causal rule already hides those not yet written).
    """
    pos = cache_position if cache_position.dim() == 2 else cache_position[None]  # (B|1, T)
    keys = torch.arange(kv_length, device=pos.device)
    visible = keys <= pos[..., None]  # (B|1, T, S)
    if attention_mask is not None:
        real = attention_mask.to(device=pos.device, dtype=torch.bool)
        if real.shape[-1] < kv_length:
            real = torch.nn.functional.pad(real, (0, kv_length - real.shape[-1]), value=True)
        visible = visible & real[:, None, :kv_length]
        # A padding query would otherwise see no key at all (NaN softmax); let it see itself. Its output is
        # never used, but NaNs must not reach anything else.
        visible = visible | (keys == pos[..., None])
    return visible[:, None]  # (B|1, 1, T, S)


class DynamicCache:
    """Keys/values per layer, grown by concatenation along the sequence."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def get_seq_length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def kv_length(self, new_tokens: int) -> int:
        """How many key slots attention sees after `new_tokens` more are written."""
        return self.get_seq_length() + new_tokens

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        """k, v: (B, KV, T, D). Returns the layer's whole (B, KV, S, D) keys and values."""
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, new_tokens: int) -> None:
        """Nothing to do: the length is the tensors' length."""

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search, dropping finished rows)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]

    def __len__(self) -> int:
        return len(self.keys)


class StaticCache:
    """Preallocated buffers written in place at `cache_position`: one (layers, B, KV, max_length, D) tensor for
    the keys of every layer and one for the values. Two tensors, not two per layer: the fused CPU decode step
    (kernels/decode_step.cpp) takes the whole cache as two arguments, and a compiled step checks fewer inputs
    before each call (its guards: 283 -> 220 us on the "small" model).

    `seq_lengths` (B,) counts the tokens written per row; callers that give no `cache_position` get
    positions from it, and `advance` moves it forward once per forward pass.
    """

    @staticmethod
    def nbytes(num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int,
               dtype: torch.dtype = torch.float32) -> int:
        """Bytes the keys and values of such a cache take."""
        return 2 * num_layers * batch_size * num_kv_heads * max_length * head_dim * dtype.itemsize

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        check_allocation(StaticCache.nbytes(*shape, dtype=dtype), device or "cpu",
                         f"a KV cache of {batch_size} sequences x {max_length} tokens",
                         "ask for fewer sequences or tokens (generate: fewer prompts at once, or a smaller "
                         "max_new_tokens)")
        self.key_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.value_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.seq_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_length = max_length
        # How many leading slots attention reads (<= max_length). The decode loop narrows it to the slots in
        # use, so attention costs what the sequences hold, not what the buffers could hold.
        self.length = max_length

    @property
    def keys(self) -> list[torch.Tensor]:
        """Each layer's (B, KV, max_length, D) key buffer (views: writing to them writes the cache)."""
        return list(self.key_buffer.unbind(0))

    @property
    def values(self) -> list[torch.Tensor]:
        return list(self.value_buffer.unbind(0))

    def get_seq_length(self) -> int:
        return int(self.seq_lengths.max())

    def kv_length(self, new_tokens: int) -> int:
        return self.length

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        B, KV, T, _ = k.shape
        # Written through one index into the whole buffer, not into a per-layer view: a compiled step then
        # updates the buffer in place, where writing into views made it copy each layer's buffer every step.
        # cache_position (T,): every row writes the same slots; (B, T): row b writes its tokens at its own.
        device = k.device
        index = (torch.tensor(layer_idx, device=device), torch.arange(B, device=device)[:, None, None],
                 torch.arange(KV, device=device)[None, :, None], cache_position.view(-1, 1, T))
        self.key_buffer.index_put_(index, k)
        self.value_buffer.index_put_(index, v)
        kc, vc = self.key_buffer[layer_idx], self.value_buffer[layer_idx]
        return kc[:, :, :self.length], vc[:, :, :self.length]

    def advance(self, new_tokens: int | torch.Tensor) -> None:
        self.seq_lengths += new_tokens

    def rows(self, start: int, stop: int) -> "StaticCache":
        """A cache over rows [start, stop) that writes through into this one: prefilling a new request into its
        slot of a running batch, or decoding only the occupied slots."""
        view = StaticCache.__new__(StaticCache)
        view.key_buffer = self.key_buffer[:, start:stop]
        view.value_buffer = self.value_buffer[:, start:stop]
        view.seq_lengths = self.seq_lengths[start:stop]
        view.max_length = view.length = self.max_length
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (compacting a batch when a sequence leaves)."""
        self.key_buffer[:, dst].copy_(self.key_buffer[:, src])
        self.value_buffer[:, dst].copy_(self.value_buffer[:, src])
        self.seq_lengths[dst] = self.seq_lengths[src]

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of row `src` into row `dst`, every layer (a server reusing the keys and
        values of a shared prompt prefix)."""
        length = min(length, self.max_length)
        self.key_buffer[:, dst, :, :length].copy_(self.key_buffer[:, src, :, :length])
        self.value_buffer[:, dst, :, :length].copy_(self.value_buffer[:, src, :, :length])

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget rows (all when None) so their slots can take new sequences."""
        if rows is None:
            self.seq_lengths.zero_()
        else:
            self.seq_lengths[rows] = 0

    def __len__(self) -> int:
        return self.key_buffer.shape[0]


IN_PLACE_MAX_TOKENS = 16  # new tokens per row up to which PagedKVCache.attend always reads the pool in place


def prefill_reads_in_place(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, length: int,
                           new_tokens: int | None = None) -> bool:
    """Whether a CPU pass of `new_tokens` (more than IN_PLACE_MAX_TOKENS) new tokens a row, attending `length`
    slots (a cached prefix and the new tokens; a fresh prompt when new_tokens is None or equals length), reads the
    pool in place (paged_prefill_attention: tiles of a prompt's query heads reading each key and value once) rather
    than SDPA's flash kernel on keys gathered from the pool (a fresh prompt's own keys need no gathering). Measured
    once per machine, head shape and pair of power-of-two buckets of new tokens and slots (dispatch.json), on a
    pass of PREFILL_PASS_TOKENS new tokens (at least one prompt) after prefixes filling the slots; past
    LONGEST_TIMED the longest bucket decides (both ways cost about new tokens x slots there). Here (AMD EPYC Zen 3,
    2 threads, 16 heads over 2 of 64, fp32): 8 prompts of 30 tokens after 1,500 cached took 15 ms in place against
    SDPA's 17-22 with the gather; fresh prompts of 4,096 tokens 409 against 274.
    GLMTORCH_PREFILL_ATTENTION=in_place|gathered decides without measuring."""
    forced = os.environ.get("GLMTORCH_PREFILL_ATTENTION", "").strip().lower()
    if forced:
        if forced not in ATTENTION_READS:
            raise ValueError(f"GLMTORCH_PREFILL_ATTENTION={forced!r}: expected one of {', '.join(ATTENTION_READS)}")
        return forced == "in_place"
    new = _bucket(length if new_tokens is None else new_tokens)
    return _in_place_wins(dtype, heads, kv_heads, head_dim, new, max(new, _bucket(length)))


def _bucket(n: int) -> int:
    """The power of two (32 to LONGEST_TIMED) whose measured choice a pass of n new tokens or slots takes."""
    size = 2 * IN_PLACE_MAX_TOKENS
    while size < min(n, LONGEST_TIMED):
        size *= 2
    return size


PREFILL_PASS_TOKENS = 512  # the pass prefill_reads_in_place times: this many new tokens in prompts of one shape
LONGEST_TIMED = 2048  # slots and new tokens: longer passes take the choice measured for this many (~0.1 s a pass)


@functools.lru_cache(maxsize=None)
def _in_place_wins(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, new: int, length: int) -> bool:
    key = f"prefill attention {str(dtype).removeprefix('torch.')} {heads} heads over {kv_heads} of {head_dim} " \
          f"new<={new} slots<={length}"
    return dispatch.decide(key, lambda: _time_prefill_attention(dtype, heads, kv_heads, head_dim, new, length)) \
        == "in_place"


def _time_prefill_attention(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, new: int,
                            length: int) -> str:
    """"in_place" or "gathered", whichever attends prompts of `new` tokens after `length - new` cached slots
    (PREFILL_PASS_TOKENS new tokens in all, at least one prompt) faster here (prefill_attention_ways)."""
    q, ways = prefill_attention_ways(dtype, heads, kv_heads, head_dim, max(1, PREFILL_PASS_TOKENS // new), new,
                                     length)
    times = dispatch.time_paths({name: ways[name] for name in ATTENTION_READS}, new, head_dim, dtype, x=q)
    return min(times, key=times.get)


def prefill_attention_ways(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, rows: int, new: int,
                           length: int) -> tuple[torch.Tensor, dict]:
    """Queries (rows, heads, new, D) of `rows` prompts of `new` tokens after `length - new` cached slots, in a pool
    of scattered 16-slot blocks, and the ways a pass of the model can attend them, each as the pass runs it (the
    queries' conversions to and from fp32, the model's mask, and for a cached prefix the gather SDPA needs):
    "in_place" (paged_prefill_attention's tiles), "gathered" (SDPA) and, for comparison, "row_at_a_time" (the
    decode kernel, a task per token: what in place was before the tiles), each giving (rows, new, heads, D).
    Random values."""
    from .attention import sdpa_attention

    g = torch.Generator().manual_seed(0)
    block, start = 16, length - new
    per_row = -(-length // block)
    # the pool's layout (PagedKVCache's buffers), random values
    keys, values = random_pool(rows * per_row + 1, kv_heads, block, head_dim, dtype, g)
    table = (torch.randperm(rows * per_row, generator=g) + 1).view(rows, per_row)
    positions = (start + torch.arange(new)).expand(rows, new)
    mask = make_attention_mask(positions, length, None) if start else None
    visible = (mask.expand(rows, 1, new, length).reshape(rows * new, length) if mask is not None
               else torch.empty(0, dtype=torch.bool))
    own = [gather_blocks(t, table, length) for t in (keys, values)]  # a fresh pass's keys: its own, no gather
    scale, ops = head_dim ** -0.5, torch.ops.glmtorch_kernels

    def in_place(q):
        tokens = q.transpose(1, 2).float()
        return ops.paged_prefill_attention(tokens, keys, values, table, positions, visible, scale).to(dtype)

    def row_at_a_time(q):
        tokens = q.transpose(1, 2).reshape(rows * new, heads, head_dim).float()
        return ops.paged_attention(tokens, keys, values, table.repeat_interleave(new, 0), positions.reshape(-1),
                                   visible, scale).view(rows, new, heads, head_dim).to(dtype)

    def gathered(q):
        k, v = (gather_blocks(keys, table, length), gather_blocks(values, table, length)) if start else own
        return sdpa_attention(q, k, v, mask, scale)[0]

    q = torch.randn(rows, heads, new, head_dim, generator=g).to(dtype)
    return q, {"in_place": in_place, "gathered": gathered, "row_at_a_time": row_at_a_time}


def keys_by_element(device: torch.device, block_size: int) -> bool:
    """Whether a pool stores each block's keys by element (PagedKVCache): on a CPU with glmtorch's kernels, in
    blocks of a multiple of 16 slots (whole registers of slots, AVX-512's 16 or AVX2's 8)."""
    return device.type == "cpu" and block_size % 16 == 0 and kernels.available()


def pool_buffers(num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, make=None,
                 by_element: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (layers, blocks, KV, block size, D) of a pool, laid out as PagedKVCache says (the keys by
    element where keys_by_element, or as `by_element` says); `make(shape, dtype)` gives the storage (zeros by
    default: anonymous memory taken as written on a CPU)."""
    if make is None:
        make = zeros_on_demand if device.type == "cpu" else \
            (lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=device))
    shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
    values = make(shape, dtype).transpose(1, 2)
    if keys_by_element(device, block_size) if by_element is None else by_element:
        keys = make((num_layers, num_kv_heads, num_blocks, head_dim, block_size), dtype).permute(0, 2, 1, 4, 3)
    else:
        keys = make(shape, dtype).transpose(1, 2)
    return keys, values


def random_pool(num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype,
                generator: torch.Generator, by_element: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's keys and values (blocks, KV, block size, D) of random values, laid out as pool_buffers lays out
    a CPU pool (benchmarks and the prefill attention's measurement)."""
    keys, values = pool_buffers(1, num_blocks, num_kv_heads, block_size, head_dim, dtype, torch.device("cpu"),
                                lambda shape, dtype: torch.randn(shape, generator=generator).to(dtype), by_element)
    return keys[0], values[0]


def gather_blocks(buffer: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """One layer's pool (blocks, KV, block size, D) read through a (B, >= length / block size) table: the first
    `length` slots of each row, (B, KV, length, D), a copy of whole blocks at a time (keys stored by element: that
    copy turned slot-major in a second, which SDPA reads; 4.0 against 0.9 ms for 8 rows x 1,590 slots of 2 x
    128-wide heads, AMD EPYC Zen 4, where index_select reading them slot-major in one strided copy took 43 ms. A
    pass after a cached prefix reads the pool in place wherever that measures faster, gather included)."""
    KV, block, D = buffer.shape[1:]
    used = table[:, :-(-length // block)]
    if buffer.stride(-1) != 1:  # (KV, blocks, D x block) in storage: the gathered blocks transposed in one copy
        blocks = buffer.permute(1, 0, 3, 2).flatten(2).index_select(1, used.flatten())
        blocks = blocks.view(KV, table.shape[0], -1, D, block).transpose(3, 4).reshape(KV, table.shape[0], -1, D)
        return blocks.transpose(0, 1)[:, :, :length]
    by_head = buffer.transpose(0, 1).flatten(2)  # (KV, blocks, block x D), the storage's layout
    blocks = by_head.index_select(1, used.flatten())
    return blocks.view(KV, table.shape[0], -1, D).transpose(0, 1)[:, :, :length]  # a view of that copy


class PagedKVCache:
    """(layers, blocks, KV, block_size, D) pools for keys and values. A forward pass is given a view of it with a
    (B, n) `block_table`: slot j of row b is block block_table[b, j // block_size], offset j % block_size (the
    same key-slot convention as every cache: slot j holds the token at position j). Table entries past a row's
    own blocks name block 0, which the engine never gives out: a padded prefill writes its padding there, and
    attention never sees it (padding and slots past a row's length are masked).

    On a CPU, decoding reads the pool through the table in place (the fused C++ step, and `attend` for the
    layer-by-layer path: up to IN_PLACE_MAX_TOKENS new tokens a row); a longer prefill, and every pass on a GPU,
    gathers each layer's blocks into (B, KV, S, D) keys and values for SDPA (one copy of the attended keys).

    On a CPU the pool is an anonymous mapping (hugepages.zeros_on_demand): zero, as every slot must be (a masked
    slot still meets the values in SDPA's product, where NaN garbage would poison it), and taking memory only as
    blocks are first written, so a generous --kv-cache-memory costs nothing until sequences fill it.

    Where the kernels read the pool (keys_by_element), each block of keys is stored by element, D x block size
    (key_buffer is a view with the same shape and indexing as ever): the decode kernel scores a register of slots
    at once with no horizontal sums. 16 rows x 512 slots of GLM-4-9B's heads (32 over 2 of 128), AMD EPYC Zen 4:
    1.45-1.50 -> 1.24-1.32 ms fp32, 1.13-1.16 -> 0.92-0.95 bf16 (scripts/bench_paged_attention.py --pools 6)."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        # Stored head-major, (layers, KV, blocks, block_size, D) (keys by element: (layers, KV, blocks, D,
        # block_size)), and seen as (layers, blocks, KV, block_size, D):
        # a gather of a row's blocks is then already (KV, n, block_size, D) per row, and its slots one run per head,
        # so SDPA takes it as a view (blocks first: the gather plus a transposing copy, 120 of a 580 ms prefill of
        # 8 rows x 25 tokens after 1,520 cached ones of "small" fp32).
        device = torch.device(device or "cpu")
        check_allocation(StaticCache.nbytes(num_layers, num_blocks, num_kv_heads, block_size, head_dim, dtype),
                         device, f"a KV cache of {num_blocks} blocks of {block_size} tokens",
                         "give it less memory (serve: --kv-cache-memory)")
        self.key_buffer, self.value_buffer = pool_buffers(num_layers, num_blocks, num_kv_heads, block_size, head_dim,
                                                          dtype, device)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.block_table: torch.Tensor | None = None  # (B, n) for the rows of the current forward pass
        self.length = 0  # slots attention reads (<= n * block_size)

    def view(self, block_table: torch.Tensor, length: int) -> "PagedKVCache":
        """The pool seen by a forward pass over len(block_table) rows attending `length` slots."""
        if block_table.shape[1] * self.block_size < length:
            raise ValueError(f"a block table of {block_table.shape[1]} blocks does not cover {length} slots")
        view = PagedKVCache.__new__(PagedKVCache)
        view.__dict__.update(self.__dict__)
        view.block_table, view.length = block_table, length
        return view

    def get_seq_length(self) -> int:
        return self.length

    def kv_length(self, new_tokens: int) -> int:
        return self.length

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """k, v: (B, KV, T, D) written at cache_position ((T,) or (B, T)) through the table; returns the (B, T)
        positions."""
        B, KV, T, D = k.shape
        positions = cache_position.view(-1, T).expand(B, T)
        blocks = self.block_table.gather(1, positions // self.block_size)  # (B, T)
        device = k.device
        index = (torch.tensor(layer_idx, device=device), blocks[:, None, :],
                 torch.arange(KV, device=device)[None, :, None], (positions % self.block_size)[:, None, :])
        self.key_buffer.index_put_(index, k)
        self.value_buffer.index_put_(index, v)
        return positions

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        """Write k, v (B, KV, T, D); returns the layer's (B, KV, length, D) keys and values gathered from the
        blocks (a copy: `attend` reads them in place where it can), or k, v themselves where they are all of it."""
        T = k.shape[2]
        self.write(layer_idx, k, v, cache_position)
        if T == self.length and cache_position.dim() == 1:
            return k, v  # a pass over fresh sequences (slots 0..T-1): the keys it attends are its own, no gather
        return (gather_blocks(self.key_buffer[layer_idx], self.block_table, self.length),
                gather_blocks(self.value_buffer[layer_idx], self.block_table, self.length))

    def reads_in_place(self, q: torch.Tensor) -> bool:
        """Whether `attend` takes these queries (B, H, T, D): on a CPU with glmtorch's kernels, a few new tokens a
        row (decoding, a speculative verify pass), and a prefill wherever that measured faster than gathering the
        keys for SDPA (prefill_reads_in_place)."""
        if q.device.type != "cpu" or not kernels.available():
            return False
        return q.shape[2] <= IN_PLACE_MAX_TOKENS or prefill_reads_in_place(
            q.dtype, q.shape[1], self.key_buffer.shape[2], q.shape[3], max(self.length, q.shape[2]), q.shape[2])

    def decide_prefill_attention(self, heads: int, longest_pass: int, longest_context: int) -> None:
        """Make now every choice prefill_reads_in_place can be asked for by passes of up to `longest_pass` new
        tokens a row over up to `longest_context` slots, for `heads` query heads in the pool's dtype: one measured
        inside a served pass holds every other stream up while it is timed (a pair of 2,048-token buckets of
        "small" takes ~1 s, all 28 pairs ~7 s, AMD EPYC Zen 3). Choices this machine measured before are read from
        dispatch.json."""
        if self.key_buffer.device.type != "cpu" or not kernels.available():
            return

        kv_heads, head_dim = self.key_buffer.shape[2], self.key_buffer.shape[4]
        new = 2 * IN_PLACE_MAX_TOKENS
        while new <= _bucket(min(longest_pass, longest_context)):
            slots = new
            while slots <= _bucket(longest_context):
                prefill_reads_in_place(self.key_buffer.dtype, heads, kv_heads, head_dim, slots, new)
                slots *= 2
            new *= 2

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache_position: torch.Tensor, mask: torch.Tensor | None, scale: float,
               padding: torch.Tensor | None = None) -> torch.Tensor:
        """Write k, v, then attention of q (B, H, T, D) over the pool read through the table in place (the C++
        kernel the fused decode step uses, in fp32): (B, T, H, D). mask: make_attention_mask's (B|1, 1, T, S), or
        None for every slot up to each query's own. padding (B, T) bool: a right-padded pass's padding tokens,
        whose queries are not attended (zeros; a served burst's questions after their cached prefixes
        were 397 real tokens in 64 x 16 rows)."""
        B, H, T, D = q.shape
        positions = self.write(layer_idx, k, v, cache_position)
        if padding is not None and T > 1:
            positions = positions.masked_fill(padding, -1)
        tokens = q.transpose(1, 2).float()  # (B, T, H, D)
        visible = (mask.expand(B, 1, T, -1).reshape(B * T, -1) if mask is not None
                   else tokens.new_empty(0, dtype=torch.bool))
        keys, values = self.key_buffer[layer_idx], self.value_buffer[layer_idx]
        if T == 1:
            out = torch.ops.glmtorch_kernels.paged_attention(tokens.reshape(B, H, D), keys, values, self.block_table,
                                                             positions.reshape(-1), visible, scale)
        else:  # a row's tokens read each key and value together
            out = torch.ops.glmtorch_kernels.paged_prefill_attention(tokens, keys, values, self.block_table, positions,
                                                                     visible, scale)
        return out.view(B, T, H, D).to(q.dtype)

    def advance(self, new_tokens: int | torch.Tensor) -> None:
        """Nothing to do: the engine keeps each sequence's length."""

    def __len__(self) -> int:
        return self.key_buffer.shape[0]
