"""Which path each CPU matrix product takes, decided by measuring on this machine.

A linear layer on the CPU can run several ways: glmtorch's C++ kernels (glmtorch.kernels: stream each weight once,
multiply in fp32 FMA or integers), the library product in the weight's own dtype (F.linear: oneDNN / MKL, which
on CPUs with AVX512-BF16 or AMX multiplies bf16 on the matrix units), or the weights widened chunk by chunk
(bf16 -> fp32, int8 / int4 -> bf16 or fp32) into the library product, or glmtorch's AMX tile kernels (bf16 and
row-interleaved int4 weights as stored; bf16 fastest here for 1-16 rows, behind oneDNN's packed product from 32;
int4 from 4 rows). Which is fastest depends on the CPU, the weight's shape and kind, and the number of rows: on an AVX2 machine without native bf16 the kernels won every
product up to 256 rows; on an AMX machine oneDNN's bf16 product is 5-10x faster from 16 rows on. CPU flags do not
settle it (a VM can list AMX and not grant it), so the first time a (kind, shape, row bucket) is seen, each
candidate runs on random input of that size (a few ms), the fastest is kept, and the table is written beside the
built kernels, keyed by CPU, torch version and thread count, for every later process.

Where the library product wins, the weight can also be kept in the layout oneDNN wants (`packed`: reordered
once into its blocked format, the only copy; glmtorch.fastpath.pack_weights), which is measured on the whole
decode step, once per model shape and row bucket (a layer is either packed or not for every row count).

How the kernels read fp32 weights for one or two rows (four rows side by side, or one at a time) is measured the
same way, once per machine (choose_fp32_row_order).

Products of 128 rows or more (prefill) may also reorder a plain weight into that layout for the one call
(`packed_per_call`), or into the kernels' blocks of 16 rows (`blocks_per_call`), where that beats the library's
product on the plain weight even counting the reorder.

How a CPU prefill attends over the paged KV cache (reading the pool in place, tiles of a prompt's query heads
reading each key once, or SDPA on keys gathered from it) is kept in the same table, per pair of buckets of new
tokens and attended slots, measured by glmtorch.cache.prefill_reads_in_place.

GLMTORCH_LINEAR_PATH=kernel|library|widen_fp32|widen_bf16|amx|packed_per_call|blocks_per_call forces a path
wherever the layer offers it (a packed layer offers only `packed`, one in blocks of 16 rows only `blocks`;
GLMTORCH_PACK=0 keeps every weight plain, =1 packs for oneDNN and =blocks into the kernels' blocks without
measuring).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable

import torch

from .cpuinfo import cpu_model_and_flags

PATHS = ("kernel", "library", "widen_fp32", "widen_bf16", "packed", "blocks", "amx", "packed_per_call",
         "blocks_per_call")
LAYOUTS = ("packed", "plain", "packed_head", "blocks")
ROW_ORDERS = ("side_by_side", "one_at_a_time")  # choose_fp32_row_order
ATTENTION_READS = ("in_place", "gathered")  # cache.prefill_reads_in_place
CHOICES = PATHS + LAYOUTS + ROW_ORDERS + ATTENTION_READS  # what a table entry may say (anything else: measured again)
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FORMAT = 4  # 2: the fused step's bf16 AMX choices also weigh the library product; 3: packed_per_call; 4: blocks
# packed_per_call and blocks_per_call (reorder the weight into oneDNN's layout, or the kernels' blocks of 16 rows,
# for one product, then drop the copy) are candidates only from this row bucket on: below it a product is bound by
# reading the weight, and the reorder reads and writes it once more, so it cannot win there, and measuring it
# would hold a transient copy of every weight.
PACK_PER_CALL_ROWS = 128
MEASURE_SECONDS = 0.02  # per candidate, after its warm-up run; at least two timed runs whatever the size

_lock = threading.RLock()
_state: dict = {"table": None, "path": None}
_seen: dict[str, str] = {}  # decisions this process used, for `glmtorch bench`


def row_bucket(rows: int) -> int:
    """The smallest bucket holding `rows` (decisions are per bucket: 3 rows run as 4 would)."""
    for b in BUCKETS:
        if rows <= b:
            return b
    return BUCKETS[-1]


def choose(kind: str, n: int, k: int, rows: int, paths: dict[str, Callable[[torch.Tensor], torch.Tensor]],
           dtype: torch.dtype) -> str:
    """The path to take for `rows` rows through an (n, k) weight of `kind`, among `paths` (name -> fn(x) -> y,
    bias excluded). Forced by GLMTORCH_LINEAR_PATH, else measured once per machine and cached."""
    forced = os.environ.get("GLMTORCH_LINEAR_PATH", "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ValueError(f"GLMTORCH_LINEAR_PATH={forced!r}: expected one of {', '.join(PATHS)}")
        if forced in paths:
            return forced
    if len(paths) == 1:
        return next(iter(paths))
    key = f"{kind} {n}x{k} rows<={row_bucket(rows)}"
    table = _table()
    choice = table.get(key)
    if choice not in paths:
        with _lock:
            choice = table.get(key)
            if choice not in paths:
                choice = _measure(paths, row_bucket(rows), k, dtype)
                table[key] = choice
                _save()
    _seen[key] = choice
    return choice


def decide(key: str, measure: Callable[[], str]) -> str:
    """A machine-level choice other than one product's path (the fused decode step against the layer-by-layer
    one, say): looked up in the same table, else measured by `measure()` once and kept."""
    if os.environ.get("GLMTORCH_LINEAR_PATH", "").strip():  # a forced path's outcome is not this machine's choice
        _seen[key] = measure()
        return _seen[key]
    table = _table()
    if table.get(key) not in CHOICES:
        with _lock:
            if table.get(key) not in CHOICES:
                table[key] = measure()
                _save()
    _seen[key] = table[key]
    return table[key]


def choose_fp32_row_order() -> str:
    """How fp32 weights meet one or two rows of x (a decode step): four weight rows read side by side, or one at a
    time. Whichever reads memory faster here: an AVX2 machine read 18-20 GB/s side by side against 15-17 one at a
    time, an AMD EPYC with AVX-512 31 against 34. Timed once per machine on a matrix four times the size of any
    L3 cache (128 MB, on huge pages as loaded weights are; ~0.3 s), kept in dispatch.json, and set in the kernels
    for every later call, the fused decode step's included. GLMTORCH_FP32_ROW_ORDER=side_by_side|one_at_a_time
    forces it."""
    from . import kernels

    if "fp32_rows" in _state or not kernels.available():
        return _state.get("fp32_rows", ROW_ORDERS[0])

    forced = os.environ.get("GLMTORCH_FP32_ROW_ORDER", "").strip().lower()
    if forced and forced not in ROW_ORDERS:
        raise ValueError(f"GLMTORCH_FP32_ROW_ORDER={forced!r}: expected one of {', '.join(ROW_ORDERS)}")
    order = forced or decide("gemv fp32 weight row order rows<=2", _time_fp32_row_orders)
    torch.ops.glmtorch_kernels.set_fp32_row_order(ROW_ORDERS.index(order))
    _state["fp32_rows"] = order
    return order


def _time_fp32_row_orders() -> str:
    from .hugepages import place_on_cpu

    weight = place_on_cpu(torch.full((16384, 2048), 0.5))
    x = torch.full((1, 2048), 0.25)
    best = {}
    try:
        for _ in range(5):  # alternated: a burst of load on a shared machine hits both alike
            for index, order in enumerate(ROW_ORDERS):
                torch.ops.glmtorch_kernels.set_fp32_row_order(index)
                start = time.perf_counter()
                torch.ops.glmtorch_kernels.gemv_float(x, weight)
                best[order] = min(best.get(order, float("inf")), time.perf_counter() - start)
    finally:
        torch.ops.glmtorch_kernels.set_fp32_row_order(0)
    return min(best, key=best.get)


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """x through `layer` (a linear layer with `cpu_paths(dtype)`, `in_features`, `out_features`; bias left to the
    caller) by the path measured fastest for this many rows. Inside a compiled graph it is one opaque op, so the
    choice is made at run time for the actual row count (dynamic there), not baked in at trace time."""
    if torch.compiler.is_compiling():  # the layer was registered when it was made (register())
        return torch.ops.glmtorch.cpu_linear(x, layer.weight, id(layer))
    rows = x.numel() // x.shape[-1]
    # The chosen function per (bucket, dtype, forced path, weights), kept on the layer: a decode step makes ~65
    # of these calls, and building the candidates and the key each time cost ~70 us a call (4.5 ms of a 41 ms
    # batch-1 step of "small" bf16). The weights' addresses are in the key: .to(), quantization or int4
    # interleaving replace them, and the kept functions hold the old tensors.
    scales = getattr(layer, "scales", None)
    key = (row_bucket(rows), x.dtype, os.environ.get("GLMTORCH_LINEAR_PATH"), _address(layer.weight),
           layer.weight.dtype, None if scales is None else scales.data_ptr())
    kept = layer.__dict__.setdefault("_dispatched", {})
    fn = kept.get(key)
    if fn is None:
        kind, paths = candidates(layer, x.dtype, rows)
        fn = kept[key] = paths[choose(kind, layer.out_features, layer.in_features, rows, paths, x.dtype)]
    return fn(x)


def candidates(layer, dtype: torch.dtype, rows: int) -> tuple[str, dict[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """(kind, paths) that `layer` offers for `rows` rows of `dtype`: its cpu_paths, less the ones that cannot win
    at this row count (packed_per_call and blocks_per_call below PACK_PER_CALL_ROWS)."""
    weight = getattr(layer, "weight", None)
    if rows <= 2 and isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and not weight.is_mkldnn:
        choose_fp32_row_order()  # before the kernels' path is timed or taken
    kind, paths = layer.cpu_paths(dtype)
    if row_bucket(rows) < PACK_PER_CALL_ROWS:
        paths.pop("packed_per_call", None)
        paths.pop("blocks_per_call", None)
    return kind, paths


def _address(t: torch.Tensor) -> int:
    """Where a weight lives: its data pointer, or for a packed (opaque oneDNN) weight, which has none, its id."""
    return id(t) if t.is_mkldnn else t.data_ptr()


_layers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register(layer) -> None:
    """Make `layer` reachable by the compiled graphs' opaque op (by id; a weak reference)."""
    _layers[id(layer)] = layer


@torch.library.custom_op("glmtorch::cpu_linear", mutates_args=())
def _cpu_linear(x: torch.Tensor, weight: torch.Tensor, layer_id: int) -> torch.Tensor:
    return linear(_layers[layer_id], x)


@_cpu_linear.register_fake
def _(x, weight, layer_id):
    return x.new_empty(*x.shape[:-1], weight.shape[0])  # weight rows are output features (int4: packed pairs)


def decisions() -> dict[str, str]:
    """What this process chose, per (kind, shape, row bucket): shown by `glmtorch bench`."""
    return dict(sorted(_seen.items()))


def cache_file() -> str:
    """dispatch.json in the built kernels' own folder (one per build, machine and torch version: two glmtorch
    versions on one machine, say an A/B worktree beside a checkout, kept one shared file and overwrote each other's
    tables, so each measured again every run); GLMTORCH_DISPATCH_CACHE names another file."""
    if _state["path"] is None and os.environ.get("GLMTORCH_DISPATCH_CACHE"):
        _state["path"] = os.environ["GLMTORCH_DISPATCH_CACHE"]
    if _state["path"] is None:
        try:
            from torch.utils.cpp_extension import _get_build_directory

            from . import kernels

            build = kernels.build_name()
            folder = _get_build_directory(build if build != "none" else "glmtorch_gemv", verbose=False)
        except Exception:  # an unusual torch: a folder of our own
            folder = os.path.join(os.path.expanduser("~"), ".cache", "glmtorch")
        _state["path"] = os.path.join(folder, "dispatch.json")
    return _state["path"]


def machine() -> str:
    """What a decision depends on besides the shape: the CPU (model and flags), torch, the thread count, and the
    kernels' build (a glmtorch whose kernels changed measures again: faster int8 kernels may now beat a library
    path an older build lost to)."""
    from . import kernels

    model, flags = cpu_model_and_flags()
    digest = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    return (f"{model} | flags {digest} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"kernels {kernels.build_name()}")


def _table() -> dict[str, str]:
    if _state["table"] is None:
        with _lock:
            if _state["table"] is None:
                _state["table"] = _load()
    return _state["table"]


def _load() -> dict[str, str]:
    path = cache_file()
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
            raise ValueError("not a dispatch table")
        if data.get("format") != FORMAT or data.get("machine") != machine():
            return {}  # another CPU, torch or thread count: measure again (and overwrite)
        return {k: v for k, v in data["choices"].items()
                if isinstance(k, str) and v in CHOICES}
    except (OSError, ValueError) as e:
        warnings.warn(f"glmtorch: ignoring the unreadable dispatch cache {path} ({e}); measuring again",
                      stacklevel=3)
        return {}


def _save() -> None:
    """Write the table (atomically: a crash leaves the old file or the new one)."""
    path = cache_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "machine": machine(), "choices": dict(sorted(_table().items()))}, f,
                      indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: decisions stay in memory for this process


def _measure(paths: dict[str, Callable], rows: int, k: int, dtype: torch.dtype) -> str:
    times = time_paths(paths, rows, k, dtype)
    return min(times, key=times.get)


def time_paths(paths: dict[str, Callable], rows: int, k: int, dtype: torch.dtype,
               x: torch.Tensor | None = None) -> dict[str, float]:
    """Seconds per call of each path on x (by default random (rows, k) input): two warm-up calls each, then rounds
    that call every remaining path once in turn (at least 3, until MEASURE_SECONDS per path or 20 rounds), and the
    best of each path's runs. Interleaved, so a burst of load on a shared machine hits every candidate alike: timed
    one after the other, a single slow stretch once sent a 512-row fp32 product to the kernels at half the
    library's speed, and the table keeps a choice for good. A path whose warm-up is already 4x slower than the
    best is not timed further (its warm-up time is what it gets)."""
    if x is None:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(0)).to(dtype)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn(x)
        return time.perf_counter() - start

    with torch.no_grad():
        times = {}
        for name, fn in paths.items():
            timed(fn)  # builds oneDNN primitives (~1 ms), faults in scratch memory
            times[name] = timed(fn)
        contenders = [name for name in paths if times[name] <= 4 * min(times.values())]
        spent = 0.0
        for round_ in range(20):
            if round_ >= 3 and spent >= MEASURE_SECONDS * len(contenders):
                break
            for name in contenders:
                run = timed(paths[name])
                times[name] = min(times[name], run)
                spent += run
    return times


def forget() -> None:
    """Drop the in-memory table, this process's decisions and every layer's kept choices (tests; a changed
    thread count)."""
    with _lock:
        _state["table"], _state["path"] = None, None
        _seen.clear()
        for layer in list(_layers.values()):
            layer.__dict__.pop("_dispatched", None)
