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


def prefill_reads_in_place(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, length: int) -> bool:
    """Whether a CPU pass of more than IN_PLACE_MAX_TOKENS new tokens a row, attending `length` slots, reads the
    pool in place (the decode kernel, one task per query row and key/value head, each reading only the keys up to
    its own) rather than SDPA's flash kernel on the pass's keys. Measured once per machine and head shape for
    powers of two of the length (dispatch.json), on prompts of that length filling a pass of 512 tokens. Past 512
    slots the lengths are measured in turn and the first at which SDPA wins decides every longer one (the kernel
    has no tiling across queries: its cost per query grows with the length faster than SDPA's; one prompt of 8192
    tokens would take seconds to time). Here (AMD EPYC, 2 threads, 16 heads over 2 of 64, bf16) in place took
    2.4 ms against SDPA's 4.9 for 6 prompts of 129 tokens, 6.9 against 7.7 for one of 512, 27 against 25 for one
    of 1024. GLMTORCH_PREFILL_ATTENTION=in_place|gathered decides without measuring."""
    forced = os.environ.get("GLMTORCH_PREFILL_ATTENTION", "").strip().lower()
    if forced:
        if forced not in ATTENTION_READS:
            raise ValueError(f"GLMTORCH_PREFILL_ATTENTION={forced!r}: expected one of {', '.join(ATTENTION_READS)}")
        return forced == "in_place"
    bucket = 2 * IN_PLACE_MAX_TOKENS
    while bucket < length:
        bucket *= 2
    if bucket <= PREFILL_PASS_TOKENS:
        return _in_place_wins(dtype, heads, kv_heads, head_dim, bucket)
    longer = 2 * PREFILL_PASS_TOKENS
    while _in_place_wins(dtype, heads, kv_heads, head_dim, longer):
        if longer >= bucket:
            return True
        longer *= 2
    return False


PREFILL_PASS_TOKENS = 512  # the pass prefill_reads_in_place times: this many tokens in prompts of one length


@functools.lru_cache(maxsize=None)
def _in_place_wins(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, length: int) -> bool:
    key = f"prefill attention {str(dtype).removeprefix('torch.')} {heads} heads over {kv_heads} of {head_dim} " \
          f"slots<={length}"
    return dispatch.decide(key, lambda: _time_prefill_attention(dtype, heads, kv_heads, head_dim, length)) \
        == "in_place"


def _time_prefill_attention(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, length: int) -> str:
    """"in_place" or "gathered", whichever attends fresh prompts of `length` tokens (PREFILL_PASS_TOKENS in all,
    at least one prompt) faster here: random queries, keys and values; the queries' conversions to and from fp32
    counted, as `attend` makes them."""
    from .attention import sdpa_attention

    g = torch.Generator().manual_seed(0)
    rows, block = max(1, PREFILL_PASS_TOKENS // length), 16
    per_row = -(-length // block)
    keys, values = (torch.randn(rows * per_row + 1, kv_heads, block, head_dim, generator=g).to(dtype)
                    for _ in range(2))
    table = torch.arange(1, rows * per_row + 1).view(rows, per_row).repeat_interleave(length, 0)
    last, everywhere = torch.arange(length).repeat(rows), torch.empty(0, dtype=torch.bool)
    k, v = (t[1:].view(rows, per_row, kv_heads, block, head_dim).transpose(1, 2)
            .reshape(rows, kv_heads, -1, head_dim)[:, :, :length] for t in (keys, values))
    scale = head_dim ** -0.5

    def in_place(q):
        flat = q.transpose(1, 2).reshape(rows * length, heads, head_dim).float()
        return torch.ops.glmtorch_kernels.paged_attention(flat, keys, values, table, last, everywhere, scale).to(dtype)

    def gathered(q):
        return sdpa_attention(q, k, v, None, scale)[0]

    q = torch.randn(rows, heads, length, head_dim, generator=g).to(dtype)
    times = dispatch.time_paths({"in_place": in_place, "gathered": gathered}, length, head_dim, dtype, x=q)
    return min(times, key=times.get)


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
    blocks are first written, so a generous --kv-cache-memory costs nothing until sequences fill it."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        # Stored head-major, (layers, KV, blocks, block_size, D), and seen as (layers, blocks, KV, block_size, D):
        # a gather of a row's blocks is then already (KV, n, block_size, D) per row, and its slots one run per head,
        # so SDPA takes it as a view (blocks first: the gather plus a transposing copy, 120 of a 580 ms prefill of
        # 8 rows x 25 tokens after 1,520 cached ones of "small" fp32).
        shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
        device = torch.device(device or "cpu")
        check_allocation(StaticCache.nbytes(num_layers, num_blocks, num_kv_heads, block_size, head_dim, dtype),
                         device, f"a KV cache of {num_blocks} blocks of {block_size} tokens",
                         "give it less memory (serve: --kv-cache-memory)")
        if device.type == "cpu":
            self.key_buffer, self.value_buffer = (zeros_on_demand(shape, dtype).transpose(1, 2) for _ in range(2))
        else:
            self.key_buffer, self.value_buffer = (torch.zeros(shape, dtype=dtype, device=device).transpose(1, 2)
                                                  for _ in range(2))
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
        B, KV, T, D = k.shape
        self.write(layer_idx, k, v, cache_position)
        if T == self.length and cache_position.dim() == 1:
            return k, v  # a pass over fresh sequences (slots 0..T-1): the keys it attends are its own, no gather
        used = self.block_table[:, :-(-self.length // self.block_size)]  # (B, n) blocks covering `length` slots

        def gather(buffer: torch.Tensor) -> torch.Tensor:
            by_head = buffer[layer_idx].transpose(0, 1).flatten(2)  # (KV, blocks, block x D), the storage's layout
            blocks = by_head.index_select(1, used.flatten())  # one copy, a block's slots at a time
            return blocks.view(KV, B, -1, D).transpose(0, 1)[:, :, :self.length]  # (B, KV, n x block, D), a view

        return gather(self.key_buffer), gather(self.value_buffer)

    def reads_in_place(self, q: torch.Tensor) -> bool:
        """Whether `attend` takes these queries (B, H, T, D): on a CPU with glmtorch's kernels, a few new tokens a
        row (decoding, a speculative verify pass), and a prefill wherever that measured faster than gathering the
        keys for SDPA (prefill_reads_in_place)."""
        if q.device.type != "cpu" or not kernels.available():
            return False
        return q.shape[2] <= IN_PLACE_MAX_TOKENS or prefill_reads_in_place(
            q.dtype, q.shape[1], self.key_buffer.shape[2], q.shape[3], max(self.length, q.shape[2]))

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache_position: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Write k, v, then attention of q (B, H, T, D) over the pool read through the table in place (the C++
        kernel the fused decode step uses, in fp32): (B, T, H, D). mask: make_attention_mask's (B|1, 1, T, S), or
        None for every slot up to each query's own."""
        B, H, T, D = q.shape
        positions = self.write(layer_idx, k, v, cache_position)
        rows = q.transpose(1, 2).reshape(B * T, H, D).float()
        table = self.block_table.repeat_interleave(T, 0) if T > 1 else self.block_table
        visible = (mask.expand(B, 1, T, -1).reshape(B * T, -1) if mask is not None
                   else rows.new_empty(0, dtype=torch.bool))
        out = torch.ops.glmtorch_kernels.paged_attention(rows, self.key_buffer[layer_idx], self.value_buffer[layer_idx],
                                                         table, positions.reshape(-1), visible, scale)
        return out.view(B, T, H, D).to(q.dtype)

    def advance(self, new_tokens: int | torch.Tensor) -> None:
        """Nothing to do: the engine keeps each sequence's length."""

    def __len__(self) -> int:
        return self.key_buffer.shape[0]
