"""What makes decoding fast, applied from outside the model.

Decoding one token reads every weight once, so batch-1 decode speed is weight bytes / memory bandwidth. On a
CPU the library matrix-vector paths (oneDNN/MKL behind F.linear) read weights at about half the bandwidth; the
kernels in glmtorch.kernels (built on first use) stream each weight once for up to 8 rows. So:

- `GemvLinear` is an nn.Linear (same parameters, same state dict) whose forward takes those kernels for a few
  rows on the CPU without autograd (decode steps); everywhere else it is F.linear, bit for bit.
- `compiled_decode_step` gives the decode step (embedding -> layers -> logits, static KV cache): on a CPU, for
  the fp32 models it covers (fp32, int8, int4 weights), the whole step in one C++ call (`FusedDecodeStep`,
  kernels/decode_step.cpp); elsewhere the model's forward compiled once per model and shape. Prefill stays
  eager, where large matrix products are what the libraries do best.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, kernels
from .hugepages import place_on_cpu
from .modeling import MLP, Attention, RMSNorm
from .quantize import Int4Linear, Int8Linear


class GemvLinear(nn.Linear):
    """nn.Linear whose CPU inference products take the path measured fastest here (glmtorch.dispatch).

    `pack(layout)` replaces the weight by the one copy a product wants, for inference: "onednn", oneDNN's blocked
    layout (an opaque mkldnn tensor, bit-identical results), or "blocks", blocks of 16 output rows
    (kernels.pack_blocks; gemv_blocks for every row count, a bf16 weight's x rounded to bf16). The state dict,
    `.to()` and loading still see the plain matrix (unpacked on the way), and a forward that needs gradients asks
    for `unpack()` first."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        dispatch.register(self)

    @property
    def packed(self) -> bool:
        """Whether the weight is in oneDNN's packed layout."""
        return self.weight.is_mkldnn

    @property
    def layout(self) -> str:
        """How the weight is held: "plain" (out, in), "onednn" (packed) or "blocks" (kernels.pack_blocks)."""
        return "onednn" if self.weight.is_mkldnn else "blocks" if self.weight.dim() == 3 else "plain"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) and x.dtype == w.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            layout = self.layout
            if layout != "plain" and not os.environ.get("GLMTORCH_LINEAR_PATH"):  # its one path, the bias inside
                return _packed_linear(x, w, self.bias) if layout == "onednn" else kernels.gemv_blocks(x, w, self.bias)
            y = dispatch.linear(self, x)
            return y + self.bias if self.bias is not None else y
        if self.layout != "plain":
            raise RuntimeError("this layer's weight is packed for CPU inference (glmtorch.fastpath.pack_weights); "
                               f"a {x.dtype} input{' that needs gradients' if x.requires_grad else ''} needs the "
                               "plain weight: call glmtorch.fastpath.unpack_weights(model) first")
        return F.linear(x, w, self.bias)

    def cpu_paths(self, dtype: torch.dtype) -> tuple[str, dict]:
        """(kind, {path: fn(x) -> x @ w.T}) for glmtorch.dispatch: the library product in the weight's dtype, the
        kernels where they take it, for bf16 the weights widened into an fp32 product (the fast one on CPUs
        that emulate bf16), and oneDNN's product on a packed copy made for this call and dropped after it (the
        weight stays plain for decoding; on an AMD EPYC with AVX-512, MKL's fp32 product ran 20-35% slower
        than reorder + packed product at 256-2016 rows). A packed weight has one path, oneDNN's product on it."""
        w = self.weight
        kind = str(w.dtype).removeprefix("torch.")
        if self.packed:
            return f"{kind} packed", {"packed": lambda x: _packed_linear(x, w)}
        if self.layout == "blocks":
            return f"{kind} blocks", {"blocks": lambda x: kernels.gemv_blocks(x, w)}
        paths = {"library": lambda x: F.linear(x, w)}
        if w.is_contiguous() and kernels.takes_width(w, w.shape[1]) and kernels.available():
            paths["kernel"] = lambda x: kernels.gemv(x, w)
        if kernels.takes_amx(w) and kernels.amx_available():
            paths["amx"] = lambda x: kernels.gemv_amx(x, w)
        if w.dtype == torch.bfloat16:
            paths["widen_fp32"] = lambda x: kernels.widened_matmul(x, lambda i, j: w[i:j].float(), w.shape[0])
        # dispatch offers these two for prefill-sized batches only (PACK_PER_CALL_ROWS)
        if packing_supported(w.dtype):
            paths["packed_per_call"] = lambda x: _packed_linear(x, _reorder(w))
        if kernels.takes_blocks(w.dtype, *w.shape):
            paths["blocks_per_call"] = lambda x: kernels.gemv_blocks(x, kernels.pack_blocks(w))
        return kind, paths

    def pack(self, layout: str = "onednn") -> None:
        global _layout_changes
        if layout not in ("onednn", "blocks"):
            raise ValueError(f"pack(layout={layout!r}): expected 'onednn' or 'blocks'")
        if self.layout == layout:
            return
        self.unpack()
        _layout_changes += 1  # a fused decode plan built on the plain weights is rebuilt (_weights_key)
        self._plain_requires_grad = self.weight.requires_grad
        self.__dict__.pop("_dispatched", None)  # its kept paths hold the plain tensor: it would stay resident
        w = self.weight.detach()
        self.weight = nn.Parameter(_reorder(w) if layout == "onednn" else place_on_cpu(kernels.pack_blocks(w)),
                                   requires_grad=False)

    def unpack(self) -> None:
        global _layout_changes
        if self.layout != "plain":
            _layout_changes += 1
            self.__dict__.pop("_dispatched", None)
            self.weight = nn.Parameter(place_on_cpu(self._plain_weight()),
                                       requires_grad=getattr(self, "_plain_requires_grad", True))

    def _plain_weight(self) -> torch.Tensor:
        w = self.weight.detach()
        return w.to_dense() if w.is_mkldnn else kernels.unpack_blocks(w) if w.dim() == 3 else w

    # The plain matrix for everything that is not an inference product.
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "plain":
            destination[prefix + "weight"] = self._plain_weight()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.unpack()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.unpack()
        return super()._apply(fn, recurse)


_layout_changes = 0
PACK_HINT_ROWS = 64  # the row count oneDNN is told to expect; measured: results within noise of a per-size packing


_can_pack: dict[torch.dtype, bool] = {}


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack and multiply `dtype` weights on this CPU: tried once on a small matrix (bf16 needs
    AVX512-BF16-class support in torch's build; on an AVX2-only CPU torch refuses it)."""
    if dtype not in _can_pack:
        try:
            w = torch.ones(16, 16, dtype=dtype)
            ok = torch.equal(_packed_linear(torch.ones(2, 16, dtype=dtype), _reorder(w)),
                             torch.nn.functional.linear(torch.ones(2, 16, dtype=dtype), w))
        except (RuntimeError, AttributeError, NotImplementedError):
            ok = False
        _can_pack[dtype] = ok and torch.backends.mkldnn.is_available()
    return _can_pack[dtype]


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_HINT_ROWS)


def _packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def pack_weights(model: nn.Module, rows: int = 1) -> int:
    """For inference at batches of up to `rows`: keep the CPU linears' weights plain, in oneDNN's packed layout (all
    of them, or only the LM head's), or all in the kernels' blocks of 16 output rows (kernels.takes_blocks: fp32 with
    AVX2 or AVX-512, bf16 with AVX512-BF16), whichever makes the decode step fastest here; returns how many layers
    left the plain layout. The CLI's generate / chat decode one row; the server up to its full batch, and one row
    when a single client is served, so for rows > 1 the step is timed at one row, at the batch and between
    (layout_sizes), and a layout must gain more where it wins than it loses where it loses (relative times multiplied).

    Decided by timing the model's decode step each way once per machine, model shape and row bucket (dispatch.json),
    not matrix by matrix: matrices timed alone sit in the cache, and the hand kernels read plain weights from huge
    pages; plain fp32 weights may also run the fused C++ step (which takes a packed LM head, not packed layers;
    blocks it takes whole). Measured on "small" (AMX Xeon, 2 threads): bf16 all packed 61 against 75 ms at 64
    rows, 38 against 33 ms at one row, so the server packs and the CLI does not; fp32 all packed 190 against 214 ms
    at 64 rows but 64 against 43 ms at one row (the fused step lost), LM head alone 198 / 48 ms: plain. oneDNN's
    results are bit-identical to the library product; the blocks' sum in another order (fp32; a bf16 weight's x
    rounded to bf16, as the library's bf16 product takes it). On an AMD EPYC (Zen 4, 2 threads), bf16 blocks
    against plain and all-packed: 20 / 18 / 29 ms at one row, 27 / 41 / 39 at 8, 120 / 155 / 141 at 64. Left
    alone: weights shared between layers (tied embeddings: the embedding looks rows up in the plain matrix), and
    all of it where GLMTORCH_PACK=0. GLMTORCH_PACK=1 packs all for oneDNN, GLMTORCH_PACK=blocks all in blocks of 16
    rows, without measuring (a layer a layout does not take stays plain)."""
    forced = os.environ.get("GLMTORCH_PACK", "").strip().lower()
    if forced not in PACK_VALUES:
        raise ValueError(f"GLMTORCH_PACK={forced!r}: expected 0 (plain), 1 (oneDNN's packed layout), blocks, "
                         "or unset (measured)")
    if forced in ("0", "false", "no"):
        unpack_weights(model)
        return 0
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        return 0
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    candidates = [layer for layer in model.modules() if type(layer) is GemvLinear and uses.get(id(layer.weight)) == 1
                  and layer.weight.dtype in (torch.float32, torch.bfloat16)]
    onednn = [layer for layer in candidates if packing_supported(layer.weight.dtype)]
    blocks = [layer for layer in candidates
              if kernels.takes_blocks(layer.weight.dtype, layer.out_features, layer.in_features)]
    if not onednn and not blocks:
        return 0
    head = getattr(model, "lm_head", None)
    # each choice: the layers it changes and the layout it gives them (the others stay plain)
    choices = {"plain": ([], "plain"), "packed_head": ([layer for layer in onednn if layer is head], "onednn"),
               "packed": (onednn, "onednn"), "blocks": (blocks, "blocks")}
    offered = [name for name, (layers, _) in choices.items() if name == "plain" or layers]
    shapes = sorted({(str(layer.weight.dtype).removeprefix("torch."), layer.out_features, layer.in_features)
                     for layer in candidates})
    sizes = layout_sizes(rows)
    # (the sizes named when more than two: the rule was one row and the batch before, decided again; the blocks
    # named where offered: a decision taken without them is taken again)
    timed_at = f"at {','.join(map(str, sizes))} " if len(sizes) > 2 else ""
    also = "or blocks " if "blocks" in offered else ""
    key = f"layout {len(model.model.layers)} layers {shapes} {also}{timed_at}rows<={dispatch.row_bucket(rows)}"

    def apply(name: str) -> None:
        layers, layout = choices.get(name, ([], "plain"))
        for layer in candidates:
            layer.pack(layout) if layer in layers else layer.unpack()

    def measure() -> str:
        # each layout with the decode step the model takes with it: plain fp32 weights may run the fused C++
        # step (which reads them as they are, and leaves a packed LM head to oneDNN), packed ones layer by layer
        step = lambda *args: compiled_decode_step(model)(model, *args)  # noqa: E731
        times = {}
        # rounds that take every layout in turn, the best of each kept: timed one after the other, a slow stretch
        # of a shared machine once gave the packed LM head the one-row decision it loses (AMD EPYC, bf16: 28.7
        # against 32.2 GB/s of batch-1 decode)
        for _ in range(LAYOUT_ROUNDS):
            for name in offered:
                apply(name)
                this_round = [time_decode_step(model, n, step=step) for n in sizes]
                times[name] = [min(a, b) for a, b in zip(times.get(name, this_round), this_round)]
        # relative times multiplied over the sizes: a layout that gains 1.2x at the batch and loses 1.15x alone wins
        return min(times, key=lambda name: math.prod(t / p for t, p in zip(times[name], times["plain"])))

    with torch.no_grad():
        if forced in ("1", "true", "yes", "blocks"):
            choice = "blocks" if forced == "blocks" else "packed"
        else:
            choice = dispatch.decide(key, measure)
        apply(choice)
    return len(choices.get(choice, ([], ""))[0])


LAYOUT_ROUNDS = 3  # pack_weights' rounds over the layouts
PACK_VALUES = ("", "0", "false", "no", "1", "true", "yes", "blocks")  # GLMTORCH_PACK


def layout_sizes(rows: int) -> list[int]:
    """The batch sizes pack_weights times a layout at, for batches of up to `rows`: one row, the batch's bucket, and
    the bucket halfway between them on a log scale (8 for 64): a server spends much of its time between one
    stream and a full batch, and a layout can win there and at the batch while it loses a little at one row
    (measured on "small" bf16, AMD EPYC, 2 threads: the LM head packed took 12% longer at one row, 15-25% less at
    8 rows, 5-13% less at 64; judged at one row and 64 alone, it lost)."""
    top = dispatch.row_bucket(rows)
    return sorted({1, dispatch.row_bucket(max(1, round(math.sqrt(top)))), top})


def time_decode_step(model, rows: int, length: int = 32, step=None) -> float:
    """Seconds of one decode step of `rows` rows on a scratch cache of `length` slots (best of 5 after a warm-up):
    the eager layer-by-layer step, or `step(tokens, positions, slot, mask, cache)` when given."""
    cache = model.new_static_cache(rows, length)
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=model.device)
    positions = torch.full((rows, 1), length - 1, dtype=torch.long, device=model.device)
    slot = torch.tensor([length - 1], device=model.device)
    mask = torch.ones(rows, length, dtype=torch.long, device=model.device)
    run = (lambda: step(tokens, positions, slot, mask, cache)) if step else (
        lambda: decode_step(model, tokens, positions, slot, mask, cache))
    best = float("inf")
    with torch.no_grad():
        run()
        for _ in range(5):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return best


def unpack_weights(model: nn.Module) -> None:
    """Undo pack_weights (before training, say)."""
    for layer in model.modules():
        if type(layer) is GemvLinear:
            layer.unpack()


def use_gemv_linears(model: nn.Module) -> nn.Module:
    """Swap every plain nn.Linear for a GemvLinear holding the same parameters (no copy)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                fast = GemvLinear.__new__(GemvLinear)
                nn.Module.__init__(fast)
                fast.in_features, fast.out_features = child.in_features, child.out_features
                fast.weight = child.weight
                fast.bias = child.bias
                dispatch.register(fast)
                setattr(module, child_name, fast)
    return model


def _inference_on_cpu(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether x goes through a C++ elementwise kernel: CPU, fp32 / bf16, contiguous, no autograd, kernels built,
    and not inside a compiled graph (Inductor fuses the eager ops there; timing them there would break the graph,
    and broke the compiled CPU step into pieces that could not keep the attended length dynamic)."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
            and (weight is None or (weight.dtype == x.dtype and weight.device.type == "cpu"))
            and not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)))
            and kernels.available())


def _fused_is_faster(name: str, x: torch.Tensor, fused, eager, rows: int | None = None) -> bool:
    """Whether the fused kernel beats the eager ops for this (op, dtype, width, row bucket) here, x's last axis the
    width: timed once, kept in dispatch.json (the bf16 SiLU-times-up lost to torch's on the AMX Xeon, the fp32 one
    won 2x; the norms won 3-13x). fused / eager take one tensor: random (rows, width) input; or, where `rows` is
    given (an op whose other inputs fix the shape), x itself, which they may ignore."""
    forced = os.environ.get("GLMTORCH_LINEAR_PATH", "").strip().lower()
    if forced in ("kernel", "library"):  # the kernels, or the library (torch's own ops), everywhere
        return forced == "kernel"
    width = x.shape[-1]
    bucket = dispatch.row_bucket(rows if rows is not None else x.numel() // max(width, 1))
    known = _fused_choices.get((name, x.dtype, width, bucket))
    if known is not None:
        return known
    key = f"{name} {str(x.dtype).removeprefix('torch.')} {width} rows<={bucket}"

    def measure() -> str:
        sample = x if rows is not None else torch.randn(bucket, width, generator=torch.Generator().manual_seed(0))
        times = dispatch.time_paths({"kernel": fused, "library": eager}, bucket, width, x.dtype, sample.to(x.dtype))
        return min(times, key=times.get)

    choice = _fused_choices[(name, x.dtype, width, bucket)] = dispatch.decide(key, measure) == "kernel"
    return choice


_fused_choices: dict[tuple, bool] = {}  # this process's decisions, without building the key string per call


class FusedRMSNorm(RMSNorm):
    """RMSNorm whose CPU inference runs as one C++ pass (kernels/elementwise.cpp: statistics in fp32, rounded
    where the eager norm rounds), where that is measured faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if _inference_on_cpu(x, w) and _fused_is_faster(
                "rms_norm", x, lambda t: torch.ops.glmtorch_kernels.rms_norm(t, w, self.eps),
                lambda t: RMSNorm.forward(self, t)):
            return torch.ops.glmtorch_kernels.rms_norm(x, w, self.eps)
        return super().forward(x)


class FusedSiluMLP(MLP):
    """The SiLU MLP with silu(gate) * up in one C++ pass over gate_up_proj's output, where measured faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if _inference_on_cpu(gate_up) and _fused_is_faster(
                "silu_mul", gate_up, torch.ops.glmtorch_kernels.silu_mul, _silu_mul):
            return self.down_proj(torch.ops.glmtorch_kernels.silu_mul(gate_up))
        return self.down_proj(_silu_mul(gate_up))


class FusedRotaryAttention(Attention):
    """Attention whose CPU inference applies the rotary embedding to q and k in one C++ pass each, straight out of
    the fused QKV product's output (kernels/elementwise.cpp: rounded where the eager ops round, so bf16 results
    are the same bits), where measured faster."""

    def rotate(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = rope
        # decided per (dtype, head_dim, tokens x heads), timed on these very inputs
        if (x.stride(-1) == 1 and _inference_on_cpu(cos) and cos.dtype == x.dtype and sin.is_contiguous()
                and not (torch.is_grad_enabled() and x.requires_grad)
                and _fused_is_faster("rotary", x, lambda _: torch.ops.glmtorch_kernels.rotary(x, cos, sin),
                                     lambda _: Attention.rotate(self, x, rope), rows=x.numel() // x.shape[-1])):
            return torch.ops.glmtorch_kernels.rotary(x, cos, sin)
        return super().rotate(x, rope)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def use_fused_elementwise(model: nn.Module) -> nn.Module:
    """Give every RMSNorm, every attention's rotary embedding, and every MLP whose activation is SiLU its fused CPU
    inference path (the class is swapped in place: same parameters, same state dict, same results up to fp32
    rounding)."""
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = FusedRMSNorm
        elif type(module) is Attention:
            module.__class__ = FusedRotaryAttention
        elif type(module) is MLP and module.act is F.silu:
            module.__class__ = FusedSiluMLP
    return model


COMPILE_MIN_BYTES = 50e6  # below this, compiling (tens of seconds) costs more than it saves in a session


def compile_forced() -> bool | None:
    """GLMTORCH_COMPILE=1 / 0 as True / False; None where it does not say."""
    forced = os.environ.get("GLMTORCH_COMPILE", "").lower()
    return forced in ("1", "true", "yes") if forced in ("0", "false", "no", "1", "true", "yes") else None


def compile_enabled(model) -> bool:
    """Whether to compile the decode step: GLMTORCH_COMPILE=1 / 0 forces it; by default on CUDA for a model of at
    least 50 MB of weights (CUDA graphs remove the launch overhead), and not on a CPU: there every matrix product
    is one opaque dispatched op (glmtorch.dispatch) that a graph cannot fuse into, and the rest is small. Measured
    on "small" bf16 (AMX Xeon, 2 threads): eager 58 ms per batch-1 step against 66 ms compiled, 177 against 169 ms
    at 64 rows, and each compiled graph cost ~45 s to build. fp32 / int8 / int4 batch-1 steps take the fused C++
    step either way."""
    if model.device.type not in ("cpu", "cuda"):
        return False
    forced = compile_forced()
    if forced is not None:
        return forced
    if model.device.type == "cpu":
        return False
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights >= COMPILE_MIN_BYTES


def decode_step(model, tokens, position_ids, cache_position, attention_mask, cache) -> torch.Tensor:
    """One token per row through the model with a static cache; returns (B, V) logits in the model's dtype (the
    fused step's are fp32): the caller widens what it samples from. A server's greedy rows never need it, and
    widening 64 rows of a 151,552-word vocabulary is a 39 MB tensor per step.

    attention_mask (B, L) also says how many leading cache slots attention reads (L); its length is marked
    dynamic, so one compiled graph serves every length."""
    cache.length = attention_mask.shape[1]
    out = model(tokens, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                cache_position=cache_position, use_cache=True)
    return out.logits[:, -1]


class FusedDecodeStep:
    """decode_step in one C++ call (kernels/decode_step.cpp) on the model's own tensors (no copies), for the CPU
    models `fused_step_supported` accepts; other models, and batches past the kernels' row limit, go to
    `fallback` (the compiled step).

    Why: at batch 1 the matrix products are nearly all of the work, and a compiled graph spent ~18% of an int4
    step of the "small" model around them (its Python wrapper calling ~165 kernels, guard checks). The plan is
    rebuilt when the model's weights are swapped (`.to(...)`, quantization): each call compares the embedding
    and LM head tensors with the ones it was built on."""

    def __init__(self, fallback) -> None:
        self.fallback, self.plan, self.max_rows, self.built_for = fallback, None, 0, None
        self.head_outside = False  # the plan stops at the final norm; the (packed) LM head runs after it
        self.linears: list = []  # one layer per distinct (kind, shape) in the plan
        self.shapes: list = []  # their (kind, out, in)
        self.kernels_win: dict[int, bool] = {}  # per row bucket
        self.amx_weights: list = []  # (plan index, kind, (N, K), {path: fn}) of products the AMX tiles could take
        self.amx_chosen: set[int] = set()  # row buckets whose AMX choices the plan has
        self.amx_bits: dict[int, int] = {}  # plan index -> the buckets it multiplies on the tiles
        self.row_split = RowSplitChoice()
        self.split_now = False  # what the plan was last told

    def _ensure_plan(self, model) -> None:
        key = _weights_key(model)
        if key != self.built_for:
            layout, _ = _fused_step_layout(model)
            self.plan, self.max_rows, self.amx_weights = _build_plan(model, layout) if layout else (None, 0, [])
            self.amx_chosen.clear()
            self.amx_bits.clear()
            self.head_outside = layout is not None and layout[1] is None
            self.linears = _distinct_linears(model) if layout else []
            self.shapes = [(layer.cpu_paths(torch.float32)[0], layer.out_features, layer.in_features)
                           for layer in self.linears]
            self.kernels_win.clear()
            self.row_split, self.split_now = RowSplitChoice(), False
            self.built_for = key
            if any(layer.weight.dtype == torch.float32 for layer in self.linears):
                dispatch.choose_fp32_row_order()  # before the plan's first step is timed or run

    def verify(self, model, tokens, position: int, slot: int, mask, cache) -> torch.Tensor | None:
        """(T, V) logits of T consecutive new tokens of one sequence (cache row 0): speculative decoding's verify
        pass as T rows of the step (rows_step)."""
        device, T = tokens.device, tokens.shape[0]
        logits = self.rows_step(model, tokens[:, None], torch.arange(position, position + T, device=device)[:, None],
                                mask.expand(T, -1), cache, torch.zeros(T, dtype=torch.long, device=device),
                                slots=torch.arange(slot, slot + T, device=device)[:, None])
        if logits is not None:
            cache.advance(T)
        return logits

    def rows_step(self, model, tokens, positions, attention_mask, cache, cache_rows, slots=None,
                  logits=None) -> torch.Tensor | None:
        """Logits of rows that each name their cache row (`cache_rows`; a paged cache's rows carry their block
        tables instead) and write at their own slot (`slots`, default their positions): several tokens of a
        sequence among the other sequences' one each (a served batch verifying proposals). None where the plan does
        not cover the model or so many rows. Taken whenever one-token steps take the plan (not by timing these
        rows): the same code computes both (the integer kernels sum each row alike whatever the row count, so with
        int8/int4 weights speculation changes no greedy token; fp32 products of one row and of several sum in
        different orders)."""
        self._ensure_plan(model)
        if self.plan is None or tokens.shape[0] > self.max_rows or not self._kernels_win(model, 1):
            return None
        self._choose_amx(tokens.shape[0])
        self._split_rows(False)  # rows of one sequence read each other's keys in each layer: never split
        return self._run_plan(model, tokens, positions, positions if slots is None else slots, attention_mask, cache,
                              cache_rows, logits)

    def __call__(self, model, tokens, position_ids, cache_position, attention_mask, cache,
                 logits=None, greedy=None) -> torch.Tensor:
        """(B, vocab) logits of one new token per row. `logits`: a (B, vocab) fp32 buffer the step may write them
        into (a caller that reuses one buffer, the server: large fresh tensors are page-faulted in at every step);
        read the returned tensor, which is that buffer or a new one. `greedy`: a (B,) int64 tensor given each row's
        most likely token (kernels.greedy_tokens of its logits), inside the plan's step where its LM head runs
        there."""
        self._ensure_plan(model)
        rows = tokens.shape[0]
        if rows > self.max_rows or not self._kernels_win(model, rows):
            out = self.fallback(model, tokens, position_ids, cache_position, attention_mask, cache)
            if greedy is not None:
                greedy.copy_(kernels.greedy_tokens(out))
            return out
        split = self.row_split.pick(rows)
        self._split_rows(split)
        if split:
            threads = torch.get_num_threads()
            for share in {rows // threads, -(-rows // threads)}:  # a thread's share multiplies on its own
                self._choose_amx(share)
        start = time.perf_counter()
        logits = self._run_plan(model, tokens, position_ids, cache_position, attention_mask, cache, None, logits,
                                greedy)
        self.row_split.record(rows, split, time.perf_counter() - start)
        cache.advance(1)
        return logits

    def _split_rows(self, split: bool | None) -> None:
        if bool(split) != self.split_now:
            self.plan.set_row_split((1 << len(dispatch.BUCKETS)) - 1 if split else 0)
            self.split_now = bool(split)

    def _run_plan(self, model, tokens, position_ids, cache_position, attention_mask, cache,
                  cache_rows=None, logits=None, greedy=None) -> torch.Tensor:
        cache.length = attention_mask.shape[1]
        out = self.plan.step(tokens, position_ids, cache_position, attention_mask, cache.key_buffer,
                             cache.value_buffer, cache_rows, getattr(cache, "block_table", None),
                             None if self.head_outside else logits, None if self.head_outside else greedy)
        if not self.head_outside:
            return out
        out = model.lm_head(out.to(model.dtype))
        if greedy is not None:
            greedy.copy_(kernels.greedy_tokens(out))
        return out

    def decide_batches(self, model, rows: int, seconds: float = 60.0) -> None:
        """Make now, for every row bucket up to `rows`, the measured choice between this step and the layers
        (_kernels_win): where it times whole steps, a served batch that first reached 128 or 256 rows waited for it
        (10 and 16 s for "small" fp32 on a machine's first start, AMD EPYC Zen 3). Kept in dispatch.json. Smaller
        buckets first, none begun after `seconds`: a model many times "small" (a 9B on two cores) would take
        minutes for its largest batches, which are then decided when a batch first needs them, as before."""
        self._ensure_plan(model)
        began = time.perf_counter()
        for bucket in dispatch.BUCKETS:
            if 1 < bucket <= min(rows, self.max_rows) and time.perf_counter() - began < seconds:
                self._kernels_win(model, bucket)

    def _kernels_win(self, model, rows: int) -> bool:
        """Whether the fused step is the faster way to run this many rows (batch 1: always, that is what the plan
        is for). Where the kernels are the measured choice for every matrix, yes; where the library wins some (a
        served batch on a CPU with matrix units), the whole step is timed both ways once per row bucket on a
        scratch cache: the fused step saves the layer-by-layer step's Python and memory traffic, which a
        per-matrix comparison does not see (fp32 at 8 rows here: per matrix the library won some products, yet
        the fused step decoded 126 tok/s against 106 layer by layer)."""
        exact = model.dtype == torch.float32  # a bf16 model's step computes in fp32: not its eager step's numbers
        if rows == 1 and exact:
            return True
        bucket = dispatch.row_bucket(rows)
        if bucket not in self.kernels_win:
            self._choose_amx(rows)  # the fused step is timed with the products it will use
            won = exact
            for layer in self.linears if exact else ():
                kind, paths = dispatch.candidates(layer, torch.float32, rows)
                won &= dispatch.choose(kind, layer.out_features, layer.in_features, rows, paths,
                                       torch.float32) == "kernel"
            if not won:  # timed once per machine (kept in dispatch.json), not in every server's first steps
                key = f"fused-step {len(model.model.layers)} layers {self.shapes} {model.dtype} rows<={bucket}"
                won = dispatch.decide(key, lambda: "kernel" if self._fused_step_is_faster(model, bucket)
                                      else "library") == "kernel"
            self.kernels_win[bucket] = won
        return self.kernels_win[bucket]

    def _choose_amx(self, rows: int) -> None:
        """For each bf16 / int4 weight shape in the plan, whether this many rows multiply faster on the AMX tiles
        than in the vector kernels (and, for bf16, than the library product): measured once per machine, shape and row bucket (glmtorch.dispatch, kept in
        dispatch.json), and set in the plan (a bit per bucket). int4 on the tiles gives the vector kernels' bits, so
        the choice never changes a token."""
        bucket = dispatch.row_bucket(rows)
        if bucket in self.amx_chosen or not self.amx_weights:
            return
        self.amx_chosen.add(bucket)
        bit = dispatch.BUCKETS.index(bucket)
        chosen: dict[tuple, bool] = {}
        for index, kind, shape, paths in self.amx_weights:
            if (kind, shape) not in chosen:
                chosen[kind, shape] = dispatch.choose(kind, *shape, rows, paths, torch.float32) == "amx"
            if chosen[kind, shape]:
                bits = self.amx_bits[index] = self.amx_bits.get(index, 0) | (1 << bit)
                self.plan.set_amx_buckets(index, bits)

    def _fused_step_is_faster(self, model, rows: int) -> bool:
        forced = os.environ.get("GLMTORCH_LINEAR_PATH", "").strip().lower()
        if forced:  # a forced path is honoured: the fused step is the kernels (bf16 products on AMX, if forced)
            return forced in ("kernel", "amx")

        def fused(*args):
            self._run_plan(model, *args)

        # the layered side eager: a compiled fallback (GLMTORCH_COMPILE=1) would build a graph for the scratch shapes
        return time_decode_step(model, rows, step=fused) <= time_decode_step(model, rows)


class RowSplitChoice:
    """Whether the fused step runs a batch with its rows split between the threads (each runs every layer for its
    share: the threads meet once a step, and each reads every weight) or with each product's columns split (each
    weight read once, the threads meeting at every product, norm and attention: ~60 times a step), per row bucket.

    Decided on the steps themselves, once per process: the first PAIRS pairs of steps of a bucket (consecutive,
    same row count) run once each way, in alternating order, and the way with the lower median time ratio is
    kept. One pair more runs first and is not counted: each way's first step pays for its first use (served, the
    first pair's ratio was 2.2-2.7 in six servers out of six, AMD EPYC Zen 3), and with the others spread over
    0.5-2.0 a pair, 16 of them, not 8, give a median the noise of a shared machine does not flip. Timing on a
    scratch cache misses what decides it (AMD EPYC, 2 cores): with 64 rows of the demo model the two were even when
    timed back to back, while in the engine's loop (its Python between steps) rows went 8-11% faster and a served
    burst ~4%; on a Zen 3 EPYC, served, columns were 7-15% faster; where every step streams weights from memory (the
    "small" model in fp32 at 16 rows) rows lose 12-36% and the pairs show it. Batches of one, and one thread, are
    never split.
    GLMTORCH_STEP_SPLIT=rows|columns forces a way."""

    PAIRS = 16

    def __init__(self) -> None:
        self.chosen: dict[int, bool] = {}  # row bucket -> split by rows
        self.ratios: dict[int, list[float]] = {}  # rows' time over columns' time, per pair so far
        self.half: dict[int, tuple] = {}  # bucket -> (rows, split, seconds) of a pair's first step
        self.warmed: set[int] = set()  # buckets whose first (uncounted) pair has run

    def pick(self, rows: int) -> bool | None:
        """How to run a step of `rows` rows: True by rows, False by columns, None where splitting cannot apply."""
        if rows < 2 or torch.get_num_threads() < 2:
            return None
        forced = forced_split()
        if forced is not None:
            return forced
        bucket = dispatch.row_bucket(rows)
        if bucket in self.chosen:
            return self.chosen[bucket]
        first = self.half.get(bucket)
        if first is not None and first[0] == rows:
            return not first[1]  # the pair's other half
        return len(self.ratios.get(bucket, ())) % 2 == 1  # a new pair: columns first, then rows first, ...

    def record(self, rows: int, split: bool | None, seconds: float) -> None:
        if split is None:
            return
        bucket = dispatch.row_bucket(rows)
        if bucket in self.chosen:  # (a forced way never completes a pair: its steps all go the same way)
            return
        first = self.half.pop(bucket, None)
        if first is None or first[0] != rows or first[1] == split:
            self.half[bucket] = (rows, split, seconds)  # a pair begins (a changed row count starts it over)
            return
        if bucket not in self.warmed:
            self.warmed.add(bucket)
            return
        by_rows, by_columns = (seconds, first[2]) if split else (first[2], seconds)
        ratios = self.ratios.setdefault(bucket, [])
        ratios.append(by_rows / by_columns)
        if len(ratios) == self.PAIRS:
            self.chosen[bucket] = sorted(ratios)[len(ratios) // 2] < 1.0

    def describe(self) -> str:
        return ", ".join(f"rows<={b}: {'by rows' if v else 'by columns'}" for b, v in sorted(self.chosen.items()))


def forced_split() -> bool | None:
    """GLMTORCH_STEP_SPLIT: "rows" (True), "columns" (False), unset (None: measured)."""
    forced = os.environ.get("GLMTORCH_STEP_SPLIT", "").strip().lower()
    if forced and forced not in ("rows", "columns"):
        raise ValueError(f"GLMTORCH_STEP_SPLIT={forced!r}: expected rows or columns (or unset: measured)")
    return None if not forced else forced == "rows"


def _distinct_linears(model) -> list:
    seen, out = set(), []
    for layer in model.modules():
        if hasattr(layer, "cpu_paths"):
            kind, _ = layer.cpu_paths(torch.float32)
            if (kind, layer.out_features, layer.in_features) not in seen:
                seen.add((kind, layer.out_features, layer.in_features))
                out.append(layer)
    return out


def _weights_key(model) -> tuple:
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    return (id(model), embed.data_ptr(), embed.dtype, embed.device, id(head) if head.is_mkldnn else head.data_ptr(),
            head.dtype, type(model.lm_head), _layout_changes)


def _linear_spec(layer) -> tuple | None:
    """(kind, weight, scales, bias, group, interleave) as the plan takes a layer, or None for a layer the kernels
    do not cover."""
    bias = layer.bias
    if getattr(layer, "packed", False):
        return None
    if (bias is not None and bias.dtype not in FUSED_DTYPES) or not kernels.takes_width(layer.weight, layer.in_features):
        return None
    if type(layer) is GemvLinear and layer.weight.dtype in FUSED_DTYPES:
        return 0, layer.weight, None, bias, 0, 1
    if isinstance(layer, Int8Linear):
        return 1, layer.weight, layer.scales, bias, 0, 1
    if isinstance(layer, Int4Linear) and layer.group_size in (32, 64, 128, 256):
        return 2, layer.weight, layer.scales, bias, layer.group_size, layer.interleave
    return None


FUSED_DTYPES = (torch.float32, torch.bfloat16)  # model dtypes the fused step takes (it computes in fp32)

# What the fused C++ step (kernels/decode_step.cpp) computes, checked one by one by _fused_step_layout; a model
# outside any of them takes the layer-by-layer step, and says which (fused_step_support). A model change (a new
# norm, another activation, another weight kind) must add its feature here and to the C++ step, or be refused.
FUSED_STEP_FEATURES = (
    "switched on (GLMTORCH_FUSED_STEP is not 0)",
    "a CPU model with a language-model head",
    "SiLU MLP",
    "an fp32 or bf16 model (the step computes in fp32)",
    "the C++ kernels built",
    "whole layers (not a tensor-parallel shard)",
    "per layer exactly: input norm, fused QKV (+ bias), o_proj, post-attention norm, gate_up, down (and GLM-4-0414's "
    "two output norms)",
    "every linear fp32, bf16, int8 or int4 (groups 32-256), of an input width the kernels take, unpacked "
    "(the LM head may be packed: it then runs after the step)",
)


def _fused_step_layout(model) -> tuple[tuple | None, str]:
    """(what the C++ plan is built from, why not): per layer (input norm, qkv, o_proj, post norm, gate_up, down,
    attention-output norm, MLP-output norm: None without sandwich norms) with each linear as _linear_spec gives it, and the LM head's spec; or None and the first of
    FUSED_STEP_FEATURES the model lacks."""
    features = FUSED_STEP_FEATURES
    if os.environ.get("GLMTORCH_FUSED_STEP", "").lower() in ("0", "false", "no"):
        return None, features[0]
    if model.device.type != "cpu" or not hasattr(model, "lm_head"):
        return None, features[1]
    if model.config.hidden_act not in ("silu", "swish"):
        return None, features[2]
    base, config = model.model, model.config
    if any(w.dtype not in FUSED_DTYPES for w in (base.embed_tokens.weight, base.norm.weight)):
        return None, features[3]
    if not kernels.available():
        return None, features[4]
    q_size = config.num_attention_heads * config.head_dim
    layers = []
    expected = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
    output_norms = ("post_self_attn_layernorm", "post_mlp_layernorm")  # GLM-4-0414's sandwich norms
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_sizes[0] != q_size or attn.num_heads % attn.num_kv_heads:
            return None, features[5]
        sandwich = getattr(layer, "sandwich_norms", False)
        if {name for name, _ in layer.named_children()} != expected | (set(output_norms) if sandwich else set()):
            return None, features[6]
        norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        norms += [getattr(layer, name).weight for name in output_norms] if sandwich else [None, None]
        specs = [_linear_spec(lin) for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(n is not None and n.dtype not in FUSED_DTYPES for n in norms):
            return None, features[3]
        if None in specs:
            return None, features[7]
        layers.append((norms[0], specs[0], specs[1], norms[1], specs[2], specs[3], norms[2], norms[3]))
    head = _linear_spec(model.lm_head)
    if head is None and getattr(model.lm_head, "packed", False):
        return (layers, None), ""  # the step stops at the final norm; the packed head runs after it
    return ((layers, head), "") if head is not None else (None, features[7])


def fused_step_support(model) -> tuple[bool, str]:
    """(whether FusedDecodeStep covers this model, the first feature of FUSED_STEP_FEATURES it lacks)."""
    layout, missing = _fused_step_layout(model)
    return layout is not None, missing


def fused_step_supported(model) -> bool:
    """Whether FusedDecodeStep covers this model: a CPU GlmForCausalLM with fp32 activations, SiLU, whole (not
    tensor-parallel) layers of fp32 / int8 / int4 weights the kernels take, and the kernels built.
    GLMTORCH_FUSED_STEP=0 turns it off."""
    return fused_step_support(model)[0]


def describe_decode_step(model) -> str:
    """Which decode step a model takes at batch 1, and why: what `glmtorch bench` prints."""
    if model.device.type != "cpu":
        if not compile_enabled(model):
            return "eager forward"
        graphs = ", CUDA graphs (a server's paged steps: eager)" if cuda_graphs_enabled(model) else ""
        return "compiled forward" + graphs
    covered, missing = fused_step_support(model)
    if covered:
        step = getattr(model, "_glmtorch_decode_step", None)
        split = step.row_split.describe() if isinstance(step, FusedDecodeStep) else ""
        return "fused C++ step (kernels/decode_step.cpp)" + (f"; batches split {split}" if split else "")
    return f"layer by layer ({'compiled' if compile_enabled(model) else 'eager'}): not fused, needs {missing}"


def _build_plan(model, layout) -> tuple:
    """The C++ plan of the model's decode step, the most rows it takes (the kernels' limit for its weights), and
    (plan index, kind, (N, K), {"kernel": fn, "amx": fn}) of its products the AMX tiles could take (bf16 weights and
    row-interleaved int4 ones, where the tiles are granted)."""
    base, config = model.model, model.config
    # a bf16 model's norms and biases go in as fp32 copies (small); its embedding and matrices as they are
    plan = torch.classes.glmtorch_kernels.DecodePlan(
        config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.rotary_dim,
        float(config.rms_norm_eps), base.embed_tokens.weight.detach(), base.norm.weight.detach().float(),
        base.rotary_emb.inv_freq.float().contiguous())

    kinds, amx_weights = set(), []

    def linear(spec) -> int:
        kind, weight, scales, bias, group, interleave = spec
        kinds.add(kind)
        index = plan.add_linear(kind, weight.detach(), None if scales is None else scales.detach().contiguous(),
                                None if bias is None else bias.detach().float().contiguous(), group, interleave)
        w, sc = weight.detach(), None if scales is None else scales.detach()
        if kind == 0 and kernels.takes_amx(weight) and kernels.amx_available():
            # the library product competes too: where it beats the tiles (oneDNN from ~32 rows) the plan keeps its
            # fp32 kernel, and the whole-step timing then hands those rows to the layer-by-layer step (in a served
            # burst of 64, the fused step on the tiles had timed level with it alone and ran 25% slower)
            amx_weights.append((index, "bfloat16 fused-step", tuple(w.shape),
                                {"kernel": lambda x: kernels.gemv(x, w), "amx": lambda x: kernels.gemv_amx(x, w),
                                 "library": lambda x: F.linear(x.to(w.dtype), w)}))
        if kind == 2 and kernels.takes_int4_amx(w, sc, group, interleave):
            amx_weights.append((index, "int4 fused-step", (w.shape[0], 2 * w.shape[1]),
                                {"kernel": lambda x: kernels.gemv_int4(x, w, sc, group, interleave),
                                 "amx": lambda x: kernels.gemv_int4_amx(x, w, sc)}))
        return index

    layers, head = layout
    for input_norm, qkv, o, post_norm, gate_up, down, attn_out_norm, mlp_out_norm in layers:
        plan.add_layer(input_norm.detach().float(), linear(qkv), linear(o), post_norm.detach().float(), linear(gate_up),
                       linear(down), *(None if n is None else n.detach().float() for n in (attn_out_norm, mlp_out_norm)))
    if head is not None:  # else the step returns the final norm's output and the caller applies the head
        plan.set_lm_head(linear(head))
    max_rows = kernels.FLOAT_MAX_ROWS if kinds == {0} else kernels.MAX_ROWS  # 0: float weights only
    return plan, max_rows, amx_weights


def verify_tokens(model, tokens: torch.Tensor, position: int, slot: int, mask: torch.Tensor, cache) -> torch.Tensor:
    """(T, V) logits for T consecutive new tokens of one sequence (batch 1) at rotary positions position.. and
    cache slots slot..; mask (1, slot + T) covers every slot they attend. The fused C++ step takes them where it
    covers the model (T rows of one cache row), else one forward pass; a single token takes the decode step."""
    step = compiled_decode_step(model)
    T = tokens.shape[0]
    if T == 1:
        return step(model, tokens[:, None], torch.tensor([[position]], device=tokens.device),
                    torch.tensor([slot], device=tokens.device), mask, cache)
    if isinstance(step, FusedDecodeStep):
        logits = step.verify(model, tokens, position, slot, mask, cache)
        if logits is not None:
            return logits
    cache.length = mask.shape[1]
    positions = torch.arange(position, position + T, device=tokens.device)
    return model(tokens[None], attention_mask=mask, position_ids=positions[None], past_key_values=cache,
                 cache_position=torch.arange(slot, slot + T, device=tokens.device), use_cache=True).logits[0]


def compiled_decode_step(model):
    """The model's decode step (built on first use, kept on the model): on a CPU the fused C++ step where it
    covers the model; elsewhere, and as its fallback, the compiled forward, or the eager one when compiling is off
    or has failed once."""
    step = getattr(model, "_glmtorch_decode_step", None)
    if step is None:
        if model.device.type == "cpu":
            kernels.available()  # built before tracing, so the compiled graph calls them
        step = _compiled_step(model) if compile_enabled(model) else decode_step
        if model.device.type == "cpu":
            step = FusedDecodeStep(step)
        model._glmtorch_decode_step = step
    return step


def cuda_graphs_enabled(model) -> bool:
    """Whether generate's compiled steps replay CUDA graphs: on a GPU, not tensor parallel (its all-reduces are
    not captured), unless GLMTORCH_CUDA_GRAPHS=0."""
    return (model.device.type == "cuda" and getattr(model, "tensor_parallel", None) is None
            and os.environ.get("GLMTORCH_CUDA_GRAPHS", "1").lower() not in ("0", "false", "no"))


_kept_cache_lock = threading.Lock()


def lend_static_cache(model, batch_size: int, slots: int):
    """generate's cache when its steps replay CUDA graphs: the model keeps the last one and lends it again to the
    next call of the same shape, so the graphs meet the addresses they were recorded with. A cache at new
    addresses is recorded anew, and torch keeps every recording in its graph tree and checks them at each step:
    a process calling generate a thousand times would hold a thousand graphs. One call at a time holds it;
    another call meanwhile gets a cache of its own. `return_static_cache` gives it back."""
    with _kept_cache_lock:
        kept = getattr(model, "_glmtorch_kept_cache", None)
        if kept is not None and not kept.lent:
            if (kept.max_length == slots and kept.seq_lengths.shape[0] == batch_size
                    and kept.key_buffer.device == model.device and kept.key_buffer.dtype == model.dtype):
                kept.reset()
                kept.lent = True
                return kept
            model._glmtorch_kept_cache = kept = None  # freed before the new one is allocated
        cache = model.new_static_cache(batch_size, slots)
        for t in (cache.key_buffer, cache.value_buffer, cache.seq_lengths):
            torch._dynamo.mark_static_address(t, guard=False)  # written in place by the graphs; another cache
            # records anew, without recompiling
        cache.lent = True
        if kept is None:
            model._glmtorch_kept_cache = cache
        return cache


def return_static_cache(cache) -> None:
    cache.lent = False


def _compiled_step(model):
    """The compiled decode step. On a GPU, a static cache's steps (generate) replay CUDA graphs: a step of "small"
    there is a few hundred kernels whose launches, not the GPU, set its pace. A graph may change nothing it was
    recorded with, so those steps attend the whole cache (`attends_whole_cache`: the caller passes a full-length
    mask, causality hides the slots not yet written), and the cache's tensors, which every step writes, are
    marked as living at fixed addresses (the caller lends the same cache again: lend_static_cache). A paged
    cache's steps (the server's) change their rows and window every step, which would record a graph per step;
    on a GPU they run eagerly unless GLMTORCH_COMPILE=1 asks: compiled, a 64-prompt burst of "small" did not
    finish in 140 s (three compiles of ~20 s, each new row count and window a guard to pass), eager it took
    1.8 s. Measured on an H200 (README, "On a GPU")."""
    graphs = cuda_graphs_enabled(model)
    compile_paged = model.device.type != "cuda" or compile_forced() is True

    # two functions, so each compiled form keeps its own graphs (dynamo caches them per function)
    def static_cache_step(*args):
        return decode_step(*args)

    def paged_cache_step(*args):
        return decode_step(*args)

    compiled_static = torch.compile(static_cache_step, mode="reduce-overhead" if graphs else None)
    compiled_paged = torch.compile(paged_cache_step)
    failed = False

    def step(*args):
        nonlocal failed
        if failed:
            return decode_step(*args)
        tokens, positions, mask, cache = args[1], args[2], args[4], args[5]
        table = getattr(cache, "block_table", None)  # a paged cache: the pool's shape is fixed, its table's is not
        # A cache at static addresses may get static shapes (torch 2.13 gives them, 2.11 did not), and a length
        # marked strictly dynamic would then fail the compile: with graphs, lengths are marked maybe-dynamic.
        dynamic = torch._dynamo.maybe_mark_dynamic if graphs and table is None else torch._dynamo.mark_dynamic
        dynamic(mask, 1)  # the attended length grows every step
        if table is not None:
            torch._dynamo.mark_dynamic(table, 1)
        for buffer in (cache.key_buffer, cache.value_buffer) if table is None else ():
            dynamic(buffer, 3)  # caches differ in size between calls
        # so do batches (the server's active requests change every few steps): one graph for every row count
        # from 2 up (a single row specializes, and gets its own)
        for t in (tokens, positions, mask, cache.seq_lengths if table is None else table):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        for buffer in (cache.key_buffer, cache.value_buffer) if table is None else ():
            torch._dynamo.maybe_mark_dynamic(buffer, 1)
        try:
            if table is not None:
                return compiled_paged(*args) if compile_paged else decode_step(*args)
            if not graphs:
                return compiled_static(*args)
            # (its cache's tensors were marked as living at fixed addresses where it was made: lend_static_cache)
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are dead: replay over them
            return compiled_static(*args).clone()  # a copy: the next replay overwrites the graph's own output
        except Exception as e:  # no compiler toolchain, an unsupported op: stay correct, warn once
            warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {e}); decoding eagerly",
                          stacklevel=2)
            failed = True
            return decode_step(*args)

    step.attends_whole_cache = graphs
    return step
