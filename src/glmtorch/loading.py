"""`from_pretrained` / `save_pretrained` for every model class, as a mixin that receives the class, so this
module never imports modeling.py.

Loading builds the model on the meta device (no memory, no init), then streams the checkpoint tensor by
tensor through its format's name table, converts each to the target dtype and device and assigns it in
place of the meta parameter. At no point are there two copies of the weights.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from .attention import check_attention_backend
from .checkpoint.formats import WeightFormat, split_stacked
from .checkpoint.gguf import GGUF_FORMAT, GgufFile, gguf_config, is_gguf
from .checkpoint.resolve import CheckpointError, resolve_checkpoint
from .checkpoint.stream import CheckpointStream
from .checkpoint.safetensors_io import (
    open_safetensors,
    parse_dtype,
    safetensors_dtype,
    save_safetensors,
    weight_files,
)
from .config import CONFIG_NAME, GlmConfig, read_config_json
from .device import infer_device
from .fastpath import use_fused_elementwise, use_gemv_linears
from .hugepages import huge_page_names, move_weights_to_huge_pages, place_on_cpu

_HEAD_TENSORS = ("lm_head.", "score.")


def load_config(directory: str, **overrides: Any) -> tuple[GlmConfig, WeightFormat]:
    """The config of a checkpoint directory and the name table of its format."""
    from .checkpoint import detect_format

    return detect_format(read_config_json(os.path.join(directory, CONFIG_NAME)), directory, **overrides)


def resolve_device(device: Any = None, device_map: Any = None) -> torch.device:
    if device is not None and device_map is not None:
        raise ValueError("pass device= or device_map=, not both")
    target = device if device is not None else device_map
    if target is None:
        return torch.device("cpu")
    if target == "auto":
        return torch.device(infer_device())
    if isinstance(target, dict):
        devices = set(target.values())
        if len(devices) != 1:
            raise ValueError(f"device_map={target!r}: glmtorch places the whole model on one device; spread a "
                             "model over several with tensor parallelism (tp_size=) instead")
        target = devices.pop()
    if isinstance(target, int):
        target = f"cuda:{target}"
    try:
        return torch.device(target)
    except RuntimeError:
        raise ValueError(f"device={target!r} is not a device torch knows (try 'cpu', 'cuda', 'cuda:1', 'mps')") from None


class PretrainedMixin:
    config: GlmConfig

    @classmethod
    def from_config(cls, config: GlmConfig, dtype: Any = None, device: Any = None,
                    attn_implementation: str | None = None):
        """A randomly initialised model (reference init: N(0, initializer_range))."""
        dtype = parse_dtype(dtype)
        model = use_fused_elementwise(use_gemv_linears(cls(config)))
        model.init_weights()
        model.to(device=resolve_device(device), dtype=dtype if isinstance(dtype, torch.dtype) else None)
        model.set_attn_implementation(attn_implementation or "sdpa")
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: GlmConfig | None = None,
        dtype: Any = "auto",
        torch_dtype: Any = None,
        device: Any = None,
        device_map: Any = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool | None = None,  # accepted and ignored: glmtorch never runs checkpoint code
        progress: bool | None = None,
        tp_size: int | None = None,
        quantize: str | None = None,
        group_size: int = 32,
        **config_overrides: Any,
    ):
        """Load a checkpoint directory (or hub id). `dtype`: torch dtype, a name ('bf16') or 'auto' (the
        checkpoint's own). `device_map='auto'` puts the model on `infer_device()`."""
        if torch_dtype is not None:
            dtype = torch_dtype
        dtype = parse_dtype(dtype)
        tp = None
        if tp_size is not None and (tp_size > 1 or "WORLD_SIZE" in os.environ):
            from .parallel import init_tensor_parallel

            tp = init_tensor_parallel(tp_size)
            if device is None and device_map is None and torch.cuda.is_available():
                device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        target_device = resolve_device(device, device_map)
        attn_implementation = check_attention_backend(attn_implementation or "sdpa", target_device)
        if is_gguf(path):
            file_config, fmt, files, directory = gguf_config(GgufFile(os.fspath(path)), **config_overrides), \
                GGUF_FORMAT, [os.fspath(path)], None
        else:
            directory = resolve_checkpoint(path)
            file_config, fmt = load_config(directory, **config_overrides)
            files = weight_files(directory)
        config = config or file_config
        if dtype == "auto" or dtype is None:
            dtype = _checkpoint_dtype(config, files) if dtype == "auto" else torch.float32

        stored_quantization = config.extra.get("quantization")
        if stored_quantization and tp is not None:  # its packed int4 / scaled int8 tensors are not sliced yet
            raise ValueError("a checkpoint stored quantized cannot be split across ranks yet; load its float "
                             "checkpoint with tp_size= and quantize= (each rank quantizes its own shard)")
        with torch.device("meta"):
            model = cls(config)
        if stored_quantization:  # a checkpoint saved quantized loads into quantized layers
            from .quantize import quantize_model

            if quantize and quantize != stored_quantization["mode"]:
                raise ValueError(f"quantize={quantize!r}, but this checkpoint is stored as "
                                 f"{stored_quantization['mode']}; load it without quantize=")
            quantize_model(model, stored_quantization["mode"], stored_quantization.get("group_size") or 32,
                           from_meta=True)
        if tp is not None:
            from .parallel import add_communication, check_divisible, shard_meta_model

            check_divisible(config, tp.world)  # on every rank, before any communication: no hang
            shard_meta_model(model, tp)
        # weights about to be quantized are not worth a copy into huge pages: what quantization makes goes there below
        load_weights(model, files, fmt, dtype, target_device, progress if tp is None or tp.rank == 0 else False, tp,
                     huge_pages=not (quantize and not stored_quantization))
        if quantize and not stored_quantization:
            from .quantize import quantize_model

            quantize_model(model, quantize, group_size)
        if quantize or stored_quantization:
            from .quantize import interleave_int4_rows

            interleave_int4_rows(model)
        use_fused_elementwise(use_gemv_linears(model))
        move_weights_to_huge_pages(model)  # what quantization made since loading (loaded weights are there already)
        if tp is not None:
            add_communication(model, tp)
        model.set_attn_implementation(attn_implementation)
        model.eval()
        model.name_or_path = os.fspath(path)
        _attach_generation_config(model, directory)
        return model

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        """config.json + model.safetensors (or shards and an index), readable by transformers too."""
        if not safe_serialization:
            raise ValueError("glmtorch writes safetensors only (pickle-based .bin files can run code on load)")
        directory = os.fspath(directory)
        tensors = {}
        seen = set()
        for name, p in self.state_dict(keep_vars=True).items():
            if id(p) in seen:  # a tied LM head is stored once, as the embedding
                continue
            seen.add(id(p))
            tensors[name] = p.detach()
        config = self.config.copy(architectures=[type(self).__name__],
                                  dtype=str(self.dtype).removeprefix("torch."))
        names = save_safetensors(tensors, directory, max_shard_size)
        config.save_pretrained(directory)
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(directory)
        return names


def load_weights(model: nn.Module, files: list[str], fmt: WeightFormat, dtype: torch.dtype,
                 device: torch.device, progress: bool | None = None, tp=None, huge_pages: bool = True) -> list[str]:
    """Stream tensors from `files` into `model`'s meta parameters through `fmt`'s table (checkpoint.stream).
    Raises one CheckpointError listing every unknown, unexpected, duplicate or mis-shaped tensor, and every missing
    one (a classification head's fresh `score` layer excepted, with a warning). Returns the names loaded.
    `huge_pages`: large CPU weights are written into 2 MB pages (the ones glmtorch.hugepages names)."""
    prefix = model.base_model_prefix
    params = dict(model.named_parameters(remove_duplicate=False))
    placed = huge_page_names(model) if huge_pages else set()
    tied = getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in params

    def skip(target: str) -> bool:  # a tied head is the embedding; a head this class lacks is not an error
        name = split_stacked(target)[0]
        return (tied and name == "lm_head.weight") or (name.startswith(_HEAD_TENSORS) and name not in params)

    expected = {name: tuple(p.shape) for name, p in params.items() if not (tied and name == "lm_head.weight")}
    shard = (lambda name, source, shape: tp.slice(name, source, shape, model.config)) if tp is not None else None
    stream = CheckpointStream(files, fmt, model.config, expected, stack=True,
                              rename=lambda target: _to_model_name(target, prefix), skip=skip, shard=shard,
                              progress=progress)
    for target, tensor, _ in stream:
        _assign(model, target, _materialise(tensor, device, _dtype_for(model, target, dtype, tensor),
                                            target in placed))
    fresh_heads = [n for n in stream.missing() if n.startswith("score.")]
    stream.finish(f"checkpoint {os.path.dirname(files[0])} does not match {type(model).__name__}",
                  optional=lambda name: name in fresh_heads)
    if fresh_heads:
        warnings.warn(f"{type(model).__name__}: {', '.join(fresh_heads)} not in the checkpoint; initialised "
                      "randomly. Train this head before using its outputs.", stacklevel=3)
        std = model.config.initializer_range
        seeded = torch.Generator().manual_seed(0)  # the same fresh head on every rank of a parallel job
        for name in fresh_heads:
            shape = params[name].shape
            init = torch.zeros(shape) if name.endswith("bias") else torch.empty(shape).normal_(0.0, std, generator=seeded)
            _assign(model, name, init.to(device=device, dtype=dtype))
    model.tie_weights()
    _check_materialised(model)
    return list(stream.done)


def _to_model_name(target: str, prefix: str) -> str:
    """Format tables speak the LM's names ("model.layers.0..."); the bare GlmModel has no "model." prefix."""
    if prefix == "" and target.startswith("model."):
        return target[len("model."):]
    return target


def _dtype_for(model: nn.Module, name: str, dtype: torch.dtype, tensor: torch.Tensor) -> torch.dtype | None:
    """The model's dtype for floating-point tensors, except where a layer keeps its own (int4 scales: fp16)."""
    if not tensor.is_floating_point():
        return None
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), "stored_dtypes", {}).get(leaf, dtype)


def _materialise(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None,
                 huge_pages: bool = True) -> torch.Tensor:
    """The weight on `device` as `dtype`; on a CPU in 2 MB pages when large (glmtorch.hugepages)."""
    if device.type == "cpu" and huge_pages:
        return place_on_cpu(tensor, dtype)
    return tensor.to(device=device, dtype=dtype)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def _check_materialised(model: nn.Module) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"internal error: tensors left unloaded: {left}")


def _checkpoint_dtype(config: GlmConfig, files: list[str]) -> torch.dtype:
    if config.dtype:
        return parse_dtype(config.dtype)
    for path in files:  # the first floating tensor decides
        handle = open_safetensors(path)
        for name in handle.keys():
            if isinstance(handle, GgufFile):
                return torch.float32  # dequantized values are fp32; "auto" keeps them exact
            if hasattr(handle, "dtype_name"):
                dtype = safetensors_dtype(handle.dtype_name(name))
            else:
                dtype = handle.get_tensor(name).dtype
            if dtype in (torch.float32, torch.bfloat16, torch.float16):
                return dtype
    return torch.float32


def _attach_generation_config(model: nn.Module, directory: str) -> None:
    from .generation.config import GENERATION_CONFIG_NAME, GenerationConfig

    path = os.path.join(directory, GENERATION_CONFIG_NAME) if directory else ""
    if directory and os.path.isfile(path):
        model.generation_config = GenerationConfig.from_file(path)
    else:
        model.generation_config = GenerationConfig.from_model_config(model.config)


