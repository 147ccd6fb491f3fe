"""`glmtorch convert SRC DST`: any checkpoint glmtorch reads -> a transformers-format checkpoint.

Tensors stream one at a time through the source format's table into shards of at most `max_shard_size`, so
converting a model needs about one shard of memory, not the model's size. Everything is written into a
temporary directory beside DST and renamed into place at the end: a failure leaves DST untouched.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import CONFIG_NAME, read_config_json
from .formats import part_name
from .resolve import CheckpointError, resolve_checkpoint
from .safetensors_io import (
    SAFE_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    iter_tensor_names,
    make_shareable,
    open_safetensors,
    parse_dtype,
    parse_size,
    read_tensor,
    safetensors_dtype,
    weight_files,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def convert_checkpoint(src: str, dst: str, dtype=None, max_shard_size: int | str = "5GB",
                       progress: bool | None = None) -> list[str]:
    """Write SRC as a transformers GLM checkpoint at DST (which must not exist). Returns the files written."""
    from . import detect_format

    directory = resolve_checkpoint(src)
    if os.path.exists(dst):
        raise CheckpointError(f"{dst}: already exists; choose a new destination or remove it first")
    config, fmt = detect_format(read_config_json(os.path.join(directory, CONFIG_NAME)), directory)
    files = weight_files(directory)
    dtype = parse_dtype(dtype)
    if dtype == "auto":
        dtype = None
    limit = parse_size(max_shard_size)
    expected = _expected_shapes(config)
    tmp = f"{os.path.abspath(dst).rstrip('/')}.partial-{os.getpid()}"
    os.makedirs(tmp)
    try:
        shard_names = _write_shards(files, fmt, config, expected, dtype, limit, tmp, progress)
        out_dtype = dtype or _first_dtype(tmp, shard_names)
        config = config.copy(architectures=["GlmForCausalLM"], dtype=str(out_dtype).removeprefix("torch."))
        config.save_pretrained(tmp)
        written = shard_names + [CONFIG_NAME] + _copy_tokenizer(directory, tmp)
        for name in os.listdir(tmp):
            make_shareable(os.path.join(tmp, name))
        os.replace(tmp, dst)
        return written
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    from ..models import GlmForCausalLM

    with torch.device("meta"):
        model = GlmForCausalLM(config)
    # the state dict's names are transformers' (q_proj, k_proj, v_proj, not the fused qkv_proj)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # stored once, as embed_tokens
    return shapes


def _write_shards(files, fmt, config, expected, dtype, limit, out_dir, progress) -> list[str]:
    entries = list(iter_tensor_names(files))
    handles: dict[str, object] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    shards: list[dict[str, str]] = []  # per shard: its tensor names
    seen: dict[str, str] = {}
    problems: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            save_file(shard, os.path.join(out_dir, f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(shard))
            shard, shard_bytes = {}, 0

    for path, name, _ in tqdm(entries, desc="Converting", unit="tensor", disable=None if progress is None else not progress):
        mapped = fmt.map_name(name)
        if mapped is None:
            problems.append(f"unexpected tensor {name!r}")
            continue
        targets, transform = mapped
        if not targets:
            continue
        if path not in handles:  # one source file mapped at a time keeps resident memory to about one shard
            handles.clear()
            handles[path] = open_safetensors(path)
        handle = handles[path]
        tensor = read_tensor(handle, path, name)
        parts = transform(tensor, config) if transform else (tensor,)
        for target, part in zip(targets, parts):
            target = part_name(target)  # written unstacked, under transformers' names
            if target == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if target not in expected:
                problems.append(f"unexpected tensor {name!r} -> {target!r}")
            elif tuple(part.shape) != expected[target]:
                problems.append(f"tensor {name!r} has shape {tuple(part.shape)}, {target!r} needs {expected[target]}")
            elif target in seen:
                problems.append(f"{target!r} is given twice, by {seen[target]!r} and {name!r}")
            else:
                seen[target] = name
                part = part.to(dtype) if dtype is not None else part
                nbytes = part.numel() * part.element_size()
                if shard and shard_bytes + nbytes > limit:
                    flush()
                shard[target] = part.contiguous()
                shard_bytes += nbytes
    flush()
    missing = sorted(set(expected) - set(seen))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:20])}")
    if problems:
        raise CheckpointError("cannot convert:\n  " + "\n  ".join(problems[:30]))
    if len(shards) == 1:
        os.replace(os.path.join(out_dir, "shard-00000.tmp"), os.path.join(out_dir, SAFE_WEIGHTS_NAME))
        return [SAFE_WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for i, (name, members) in enumerate(zip(names, shards)):
        os.replace(os.path.join(out_dir, f"shard-{i:05d}.tmp"), os.path.join(out_dir, name))
        handle = open_safetensors(os.path.join(out_dir, name))
        for member in members:
            weight_map[member] = name
            t = handle.get_slice(member)
            total += _numel(t.get_shape()) * safetensors_dtype(t.get_dtype(), torch.float32).itemsize
    with open(os.path.join(out_dir, SAFE_INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [SAFE_INDEX_NAME]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _first_dtype(out_dir: str, names: list[str]) -> torch.dtype:
    handle = open_safetensors(os.path.join(out_dir, names[0]))
    first = next(iter(handle.keys()))
    return safetensors_dtype(handle.dtype_name(first), torch.float32)


def _copy_tokenizer(src: str, dst: str) -> list[str]:
    """Tokenizer files as they are; THUDM's tiktoken-style tokenizer.model becomes a tokenizer.json."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    if "tokenizer.json" not in copied and os.path.isfile(os.path.join(src, "tokenizer.model")):
        from ..tokenizer import GlmTokenizer, TokenizerError

        try:
            tokenizer = GlmTokenizer.from_pretrained(src)
        except TokenizerError:  # not tiktoken-style (ChatGLM2/3 SentencePiece): keep the file as it is
            shutil.copy(os.path.join(src, "tokenizer.model"), os.path.join(dst, "tokenizer.model"))
            return copied + ["tokenizer.model"]
        copied = sorted(set(copied) | set(tokenizer.save_pretrained(dst)))
    return copied
