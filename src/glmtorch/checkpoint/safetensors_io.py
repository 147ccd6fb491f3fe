"""Read and write safetensors checkpoints: one file or shards with `model.safetensors.index.json`.

Reading streams tensor by tensor from memory-mapped files, so loading never holds a second copy of the
model. Writing goes to temporary names renamed into place at the end, so a failure never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .resolve import CheckpointError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# safetensors' dtype names of the float types glmtorch reads, and their sizes in bytes
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def safetensors_dtype(name: str, default: torch.dtype | None = None) -> torch.dtype | None:
    """torch dtype of a safetensors dtype name ("BF16"), or `default` for the others (integers, F64...)."""
    return SAFETENSORS_DTYPES.get(name, default)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """torch.dtype, a name ("bf16", "bfloat16", "torch.float16"), "auto" or None."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of float32, bfloat16, float16 or 'auto'")
    return DTYPES[name]


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size such as '5GB' or '500MB'")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def weight_files(directory: str) -> list[str]:
    """The weight files of a checkpoint (safetensors preferred, else PyTorch .bin), checked to exist before
    anything is loaded."""
    for index_name, single_name in ((SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME), (BIN_INDEX_NAME, BIN_WEIGHTS_NAME)):
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid weights index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
            if missing:
                raise CheckpointError(f"{index} names shard(s) that are not in {directory}: {', '.join(missing)}; "
                                      "the download is incomplete")
            return [os.path.join(directory, name) for name in files]
        if os.path.isfile(os.path.join(directory, single_name)):
            return [os.path.join(directory, single_name)]
    others = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(directory, name) for name in others]
    raise CheckpointError(f"{directory}: no {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME} or other *.safetensors file "
                          f"(nor {BIN_WEIGHTS_NAME})")


class _BinFile:
    """A PyTorch .bin state dict, read with weights_only=True (no code runs) and memory-mapped."""

    def __init__(self, path: str) -> None:
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path}: refused to load ({str(e).splitlines()[0][:200]}). glmtorch reads .bin "
                                  "files only with torch.load(weights_only=True), which never runs code; convert "
                                  "this checkpoint to safetensors with a tool you trust") from None
        if not isinstance(self.tensors, dict):
            raise CheckpointError(f"{path}: not a state dict of tensors")

    def keys(self):
        return self.tensors.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)


class _SafetensorsFile:
    def __init__(self, path: str) -> None:
        try:
            self.handle = safe_open(path, framework="pt")
        except Exception as e:  # SafetensorError for truncated or corrupt files
            raise CheckpointError(f"{path}: cannot read this safetensors file ({e}); it is truncated or corrupt, "
                                  "download it again") from None

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)

    def get_slice(self, name: str):
        return self.handle.get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self.handle.get_slice(name).get_dtype()


# Readers of other weight files by suffix: a format with files of its own registers its reader here when its
# module is imported (gguf.py: ".gguf"), so this I/O layer never imports a format.
WEIGHT_READERS: dict[str, Callable[[str], Any]] = {}


def open_safetensors(path: str):
    """A reader for one weight file: keys(), shape(name), get_tensor(name)."""
    for suffix, reader in WEIGHT_READERS.items():
        if path.endswith(suffix):
            return reader(path)
    return _BinFile(path) if path.endswith(".bin") else _SafetensorsFile(path)


def iter_tensor_names(files: list[str]) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(file, name, shape) of every tensor, reading headers only."""
    for path in files:
        handle = open_safetensors(path)
        for name in handle.keys():
            yield path, name, handle.shape(name)


def read_tensor(handle, path: str, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e}); the file is corrupt") from None


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning its memory: safetensors refuses tensors that share it (the q, k and v rows of the
    fused qkv_proj are views of one matrix), so a view is copied, one shard at a time."""
    t = t.detach().contiguous().cpu()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def save_safetensors(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    directory: str,
    max_shard_size: int | str = "5GB",
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write tensors (a dict, or (name, tensor) pairs as they come: only one shard is held at a time) as
    `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards plus an index when they exceed
    `max_shard_size`. Shards go to temporary files first: an exception, from the writing or from the source of the
    pairs, leaves the directory as it was. Returns the file names written."""
    limit = parse_size(max_shard_size)
    metadata = {"format": "pt", **(metadata or {})}
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    os.makedirs(directory, exist_ok=True)
    tmp_paths: list[str] = []
    members: list[list[str]] = []  # per shard: its tensor names
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            tmp = os.path.join(directory, f".shard-{len(tmp_paths):05d}.tmp-{os.getpid()}")
            tmp_paths.append(tmp)
            save_file({k: _standalone(v) for k, v in shard.items()}, tmp, metadata=metadata)
            members.append(list(shard))
            shard, size = {}, 0

    try:
        for name, t in pairs:
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > limit:
                flush()
            shard[name] = t
            size += nbytes
            total += nbytes
        flush()
    except BaseException:
        for tmp in tmp_paths:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    if len(tmp_paths) <= 1:
        names = [SAFE_WEIGHTS_NAME]
        if not tmp_paths:  # no tensors at all: still a valid (empty) file
            empty = os.path.join(directory, f".shard-00000.tmp-{os.getpid()}")
            save_file({}, empty, metadata=metadata)
            tmp_paths.append(empty)
    else:
        names = [f"model-{i + 1:05d}-of-{len(tmp_paths):05d}.safetensors" for i in range(len(tmp_paths))]
    index_text = None
    if len(names) > 1:
        weight_map = {k: name for name, shard_members in zip(names, members) for k in shard_members}
        index_text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    # Everything is on disk: swap it in, and drop weight files of an earlier save that would now confuse a reader.
    stale = {SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME} | {
        f for f in os.listdir(directory) if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)}
    for f in stale - set(names):
        os.remove(os.path.join(directory, f)) if os.path.exists(os.path.join(directory, f)) else None
    for name, tmp in zip(names, tmp_paths):
        make_shareable(tmp)
        os.replace(tmp, os.path.join(directory, name))
    if index_text is not None:
        with open(os.path.join(directory, SAFE_INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(index_text)
        names.append(SAFE_INDEX_NAME)
    return names


def make_shareable(path: str) -> None:
    """Give a written file the permissions the user's umask asks for (safetensors creates its files 0600; a
    checkpoint is meant to be read by others, as any file the user writes)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
