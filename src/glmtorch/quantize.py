"""Weight-only quantization: int8 per output channel, int4 symmetric in groups (32 by default).

Quantized linear layers replace nn.Linear from outside (`quantize_model`), so the model code never branches on
them. Weights are stored quantized (int8 values, or two int4 values per uint8) with their scales, and the mode
is recorded in config.json ("quantization": {"mode", "group_size"}), never guessed from a file name.

On the CPU a few rows (decode steps) go through glmtorch's own kernels (glmtorch.kernels), which read the
packed weights once and multiply in integers; more rows (prefill) dequantize a chunk of rows at a time into an
fp32 matrix product. Without the kernels, a single int8 row takes torch's `_weight_int8pack_mm`. Other
devices dequantize on the fly and use the regular matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, kernels

MODES = ("int8", "int4")
_HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale (+ bias); q int8 (N, K), scale (N,) per output channel."""

    weight_bytes = True

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.float32, device=None) -> None:
        super().__init__()
        dispatch.register(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
        # the weight's own shape: a tensor-parallel shard's module still says the whole matrix's in / out features
        out = cls(w.shape[1], w.shape[0], linear.bias is not None, linear.weight.dtype, w.device)
        out.weight.data, out.scales.data = q, scale.to(linear.weight.dtype)
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    def dequantized(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The weight rows [start, stop) as a dense matrix."""
        return self.weight[start:stop].to(dtype) * self.scales[start:stop, None].to(dtype)

    def cpu_paths(self, dtype: torch.dtype) -> tuple[str, dict]:
        """(kind, {path: fn(x)}) for glmtorch.dispatch: the integer kernels, or the weights dequantized chunk by
        chunk into the library product (_widened_paths)."""
        paths = _widened_paths(self, dtype)
        if kernels.takes_width(self.weight, self.in_features) and kernels.available():
            paths["kernel"] = lambda x: kernels.gemv_int8(x, self.weight, self.scales)
        return "int8", paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and (kernels.available() or x.numel() > x.shape[-1]):
            y = dispatch.linear(self, x)
        elif x.device.type == "cpu" and _HAS_INT8_KERNEL:
            # One row (batch-1 decode): torch's int8 weight-only kernel reads one byte per weight; it takes bf16
            # activations (fp32 there measured 6x slower).
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(1, -1).to(torch.bfloat16), self.weight,
                                                   self.scales.to(torch.bfloat16))
            y = y.to(x.dtype).view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y + self.bias if self.bias is not None else y


class Int4Linear(nn.Module):
    """Symmetric int4 in groups along the input: w = q * scale[group], q in [-8, 7] stored two per byte (as
    q + 8), on llama.cpp's Q4_0 grid, with fp16 scales as Q4_0 has them: one scale per 32 weights is an eighth
    of the bytes a decode step reads at fp32 and a sixteenth at fp16, and fp16's 11-bit precision is far finer
    than the 4-bit grid it scales."""

    weight_bytes = True
    stored_dtypes = {"scales": torch.float16}  # whatever the model's dtype (loading keeps it)
    # Rows per interleaved block in memory (1: plain). On a CPU with the kernels, loading interleaves the rows
    # (interleave_int4_rows) so that the decode kernel reads one sequential stream; the state dict, dequantized()
    # and everything outside the kernel see the plain layout.
    interleave = 1

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 32,
                 dtype=torch.float32, device=None) -> None:
        super().__init__()
        dispatch.register(self)
        if in_features % group_size or group_size % 2:
            raise ValueError(f"int4 group_size={group_size} must be even and divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, in_features // group_size,
                                               dtype=self.stored_dtypes["scales"], device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.register_state_dict_post_hook(_plain_int4_state)
        self.register_load_state_dict_pre_hook(_interleaved_int4_state)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        w = linear.weight.detach().float()
        N, K = w.shape
        groups = w.view(N, K // group_size, group_size)
        # llama.cpp's Q4_0 grid: the value of largest magnitude maps to -8, so all 16 levels are used and a
        # GGUF export (Q4_0, group 32) holds exactly these values
        extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        scale = torch.where(extreme == 0, torch.ones_like(extreme), extreme / -8)  # (N, K / g), sign included
        if scale.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"int4: a weight of magnitude {extreme.abs().max():.3g} is beyond the range of its "
                             "fp16 group scale; quantize this model to int8 instead")
        scale = scale.to(torch.float16).float()  # quantize against the scale that is stored
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # below fp16's range: the group is ~0
        q = (groups / scale[..., None]).round().clamp(-8, 7).to(torch.int16).view(N, K) + 8  # 0..15
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
        out = cls(K, N, linear.bias is not None, group_size, linear.weight.dtype, w.device)
        out.weight.data, out.scales.data = packed, scale.to(torch.float16)
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    def interleave_rows(self, rows: int) -> bool:
        """Store the weight and scales with `rows` rows interleaved (the kernels' layout); False where it does not
        apply (its kernel needs group 32, fp16 scales, 64 | in_features and rows | out_features)."""
        if (rows <= 1 or self.interleave != 1 or self.group_size != 32 or self.in_features % 64
                or self.out_features % rows or self.scales.dtype != torch.float16 or self.weight.device.type != "cpu"):
            return False
        self.weight.data = _interleave(self.weight.data, rows, 32)
        self.scales.data = _interleave(self.scales.data, rows, 2)
        self.interleave = rows
        return True

    def _apply(self, fn, recurse=True):
        # .to(dtype / device) and friends: the interleaved kernel reads fp16 scales on the CPU only, so a layer
        # moved or cast away from that goes back to the plain layout (which every path reads)
        super()._apply(fn, recurse)
        if self.interleave > 1 and (self.scales.dtype != torch.float16 or self.weight.device.type != "cpu"):
            weight, scales = self.plain()
            self.weight.data, self.scales.data = weight, scales
            self.interleave = 1
        return self

    def plain(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed weight, scales) of rows [start, stop) in the plain row-major layout."""
        stop = self.out_features if stop is None else stop
        R = self.interleave
        if R == 1:
            return self.weight[start:stop], self.scales[start:stop]
        first, last = start // R * R, -(-stop // R) * R  # whole blocks around the rows asked for
        packed = _deinterleave(self.weight[first:last], R, 32)[start - first:stop - first]
        scales = _deinterleave(self.scales[first:last], R, 2)[start - first:stop - first]
        return packed, scales

    def dequantized(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The weight rows [start, stop) as a dense matrix."""
        packed, scales = self.plain(start, stop)
        rows = packed.shape[0]
        low = (packed & 0xF).to(torch.int8) - 8
        high = (packed >> 4).to(torch.int8) - 8
        q = torch.stack([low, high], dim=-1).view(rows, self.in_features // self.group_size, self.group_size)
        return (q.to(dtype) * scales.to(dtype)[..., None]).view(rows, self.in_features)

    def cpu_paths(self, dtype: torch.dtype) -> tuple[str, dict]:
        """As Int8Linear.cpu_paths, with the int4 kernels (groups of 32-256)."""
        paths = _widened_paths(self, dtype)
        if (self.group_size in (32, 64, 128, 256) and kernels.takes_width(self.weight, self.in_features)
                and kernels.available()):
            paths["kernel"] = lambda x: kernels.gemv_int4(x, self.weight, self.scales, self.group_size,
                                                          self.interleave)
            if kernels.takes_int4_amx(self.weight, self.scales, self.group_size, self.interleave):
                paths["amx"] = lambda x: kernels.gemv_int4_amx(x, self.weight, self.scales)
        return f"int4g{self.group_size}", paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            y = dispatch.linear(self, x)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y + self.bias if self.bias is not None else y


def _widened_paths(layer, dtype: torch.dtype) -> dict:
    """A quantized layer's weights dequantized chunk by chunk into the library product: in fp32, and for bf16
    activations in bf16 too (the matrix units of AVX512-BF16 / AMX CPUs)."""
    paths = {"widen_fp32": lambda x: kernels.widened_matmul(
        x, lambda i, j: layer.dequantized(torch.float32, i, j), layer.out_features)}
    if dtype == torch.bfloat16:
        paths["widen_bf16"] = lambda x: kernels.widened_matmul(
            x, lambda i, j: layer.dequantized(torch.bfloat16, i, j), layer.out_features, torch.bfloat16)
    return paths


def _interleave(t: torch.Tensor, rows: int, unit: int) -> torch.Tensor:
    """(N, C) -> the same values with each block of `rows` rows stored unit by unit: [unit 0 of every row of the
    block | unit 1 of every row | ...] (a 32-byte unit is one pair of int4 blocks, a 2-scale unit its scales)."""
    N, C = t.shape
    return t.reshape(N // rows, rows, C // unit, unit).transpose(1, 2).contiguous().view(N, C)


def _deinterleave(t: torch.Tensor, rows: int, unit: int) -> torch.Tensor:
    N, C = t.shape
    return t.reshape(N // rows, C // unit, rows, unit).transpose(1, 2).contiguous().view(N, C)


def _plain_int4_state(module, state_dict, prefix, local_metadata) -> None:
    """The state dict holds the plain layout, whatever the layer keeps in memory."""
    if module.interleave > 1:
        state_dict[prefix + "weight"], state_dict[prefix + "scales"] = module.plain()


def _interleaved_int4_state(module, state_dict, prefix, *args) -> None:
    if module.interleave > 1 and prefix + "weight" in state_dict and prefix + "scales" in state_dict:
        state_dict[prefix + "weight"] = _interleave(state_dict[prefix + "weight"], module.interleave, 32)
        state_dict[prefix + "scales"] = _interleave(state_dict[prefix + "scales"], module.interleave, 2)


def interleave_int4_rows(model: nn.Module) -> nn.Module:
    """Put every int4 layer of a CPU model in the layout its decode kernel reads fastest (no-op without the
    kernels): called once weights are loaded."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear) and m.weight.device.type == "cpu"]
    if layers:
        rows = kernels.int4_row_interleave()
        for layer in layers:
            layer.interleave_rows(rows)
    return model


def quantize_model(model: nn.Module, mode: str, group_size: int = 32, from_meta: bool = False) -> nn.Module:
    """Replace every nn.Linear (LM head included, like llama.cpp's Q8_0/Q4_0) by its quantized form.

    from_meta: build empty quantized layers on the meta device (to load a quantized checkpoint into)."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "int4" and (not isinstance(group_size, int) or group_size < 2 or group_size % 2):
        raise ValueError(f"group_size={group_size}: must be an even integer >= 2")
    cls = Int8Linear if mode == "int8" else Int4Linear
    tied = getattr(model.config, "tie_word_embeddings", False)
    if mode == "int4":  # checked for every layer before any is replaced: no half-quantized model
        for name, child in model.named_modules():
            if isinstance(child, nn.Linear) and child.in_features % group_size:
                raise ValueError(f"int4 quantizes groups of {group_size} inputs, but {name} takes "
                                 f"{child.in_features}; pass a group_size that divides it (quantize with "
                                 f"group_size=), or use int8")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if tied and f"{name}.{child_name}".lstrip(".") == "lm_head":
                continue  # shares its matrix with the embedding, which stays unquantized
            if from_meta:
                kwargs = dict(dtype=child.weight.dtype, device="meta")
                if mode == "int4":
                    kwargs["group_size"] = group_size
                new = cls(child.in_features, child.out_features, child.bias is not None, **kwargs)
            else:
                new = cls.from_linear(child, group_size)
            setattr(module, child_name, new)
    model.config.extra["quantization"] = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    return model
