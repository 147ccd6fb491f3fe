"""`glmtorch convert SRC DST`: any checkpoint glmtorch reads -> a transformers-format checkpoint.

Tensors stream one at a time through the source format's table into shards of at most `max_shard_size`, so
converting a model needs about one shard of memory, not the model's size. Everything is written into a
temporary directory beside DST and renamed into place at the end: a failure leaves DST untouched.
"""

from __future__ import annotations

import os
import shutil

import torch

from ..config import CONFIG_NAME, read_config_json
from .resolve import CheckpointError, resolve_checkpoint
from .safetensors_io import make_shareable, parse_dtype, parse_size, save_safetensors, weight_files
from .stream import CheckpointStream

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
        shard_names, first_dtype = _write_shards(files, fmt, config, expected, dtype, limit, tmp, progress)
        out_dtype = dtype or first_dtype
        config = config.copy(architectures=[_causal_lm_class(config).__name__], dtype=str(out_dtype).removeprefix("torch."))
        config.save_pretrained(tmp)
        written = shard_names + [CONFIG_NAME] + _copy_tokenizer(directory, tmp)
        for name in os.listdir(tmp):
            make_shareable(os.path.join(tmp, name))
        os.replace(tmp, dst)
        return written
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _causal_lm_class(config):
    from ..auto import AutoModelForCausalLM

    return AutoModelForCausalLM.model_class(config)


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = _causal_lm_class(config)(config)
    # the state dict's names are transformers' (q_proj, k_proj, v_proj, not the fused qkv_proj)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # stored once, as embed_tokens
    return shapes


def _write_shards(files, fmt, config, expected, dtype, limit, out_dir, progress) -> tuple[list[str], torch.dtype]:
    """Every tensor through the checkpoint stream (unstacked, under transformers' names) into shards; returns the
    files written and the dtype of the first tensor."""
    stream = CheckpointStream(files, fmt, config, expected, stack=False,
                              skip=lambda target: target == "lm_head.weight" and config.tie_word_embeddings,
                              keep_open=False, desc="Converting", progress=progress)
    first: list[torch.dtype] = []

    def tensors():
        for name, tensor, _ in stream:
            tensor = (tensor.to(dtype) if dtype is not None else tensor).contiguous()
            first.append(tensor.dtype) if not first else None
            yield name, tensor
        stream.finish("cannot convert")  # raising here: save_safetensors removes the shards it wrote

    names = save_safetensors(tensors(), out_dir, limit)
    return names, (first[0] if first else torch.float32)


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
