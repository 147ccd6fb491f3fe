"""Tensor parallelism on torch.distributed (NCCL on GPUs, gloo on CPUs), applied from outside the model.

The plan is data: each weight's name pattern says how it is cut across `world` ranks.

    q_proj            columns (output rows) by query heads
    k_proj, v_proj    columns by key/value heads; replicated per group when there are fewer KV heads than
                      ranks (MQA), each rank keeping the one its query heads use
    qkv_proj          the model's fused [q | k | v]: this rank's rows of each part, stacked (its parts load
                      one by one, each cut by its own rule above)
    gate_up_proj      columns, cut per half so each rank keeps matching [gate | up] slices
    o_proj, down_proj rows (input columns), outputs summed with an all-reduce
    embed_tokens      by vocabulary (each rank embeds its id range, summed with an all-reduce)
    lm_head           by vocabulary, logits joined with an all-gather

Each rank reads only its slices from the safetensors files. Attention infers the head count from its
(sliced) weights, so the model code has no parallel branches, and the KV cache holds only this rank's heads.
"""

from __future__ import annotations

import atexit
import fnmatch
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

TP_PLAN = {
    "*embed_tokens.weight": "vocab",
    "*self_attn.q_proj.*": "heads_q",
    "*self_attn.k_proj.*": "heads_kv",
    "*self_attn.v_proj.*": "heads_kv",
    "*self_attn.qkv_proj.*": "heads_qkv",
    "*self_attn.o_proj.weight": "rowwise",
    "*mlp.gate_up_proj.weight": "fused_pair",
    "*mlp.down_proj.weight": "rowwise",
    "lm_head.weight": "vocab",
}


class ParallelError(ValueError):
    """A model that cannot be split across this many ranks."""


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world: int
    group: object = None

    def style(self, name: str) -> str | None:
        return next((style for pattern, style in TP_PLAN.items() if fnmatch.fnmatch(name, pattern)), None)

    def index(self, name: str, shape: tuple[int, ...], config) -> tuple[int, list[tuple[int, int]]] | None:
        """(dimension, [(start, stop), ...]) ranges this rank keeps of a full tensor, or None to keep it all."""
        style = self.style(name)
        if style is None:
            return None
        r, n = self.rank, self.world
        if style == "heads_q":
            return 0, [self._query_rows(config)]
        if style == "heads_kv":
            return 0, [self._key_value_rows(config)]
        if style == "heads_qkv":  # [q | k | v] rows: each part's own range, shifted to where the part starts
            q_rows, kv_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
            q, (a, b) = self._query_rows(config), self._key_value_rows(config)
            return 0, [q, (q_rows + a, q_rows + b), (q_rows + kv_rows + a, q_rows + kv_rows + b)]
        if style == "fused_pair":
            half = shape[0] // 2
            per = half // n
            return 0, [(r * per, (r + 1) * per), (half + r * per, half + (r + 1) * per)]
        if style == "rowwise":
            per = shape[1] // n
            return 1, [(r * per, (r + 1) * per)]
        if style == "vocab":
            if config.vocab_size % n:
                return None  # replicated: the vocabulary does not divide evenly
            per = config.vocab_size // n
            return 0, [(r * per, (r + 1) * per)]
        raise AssertionError(style)

    def _query_rows(self, config) -> tuple[int, int]:
        per, D = config.num_attention_heads // self.world, config.head_dim
        return self.rank * per * D, (self.rank + 1) * per * D

    def _key_value_rows(self, config) -> tuple[int, int]:
        kv, D = config.num_key_value_heads, config.head_dim
        if kv >= self.world:
            per = kv // self.world
            return self.rank * per * D, (self.rank + 1) * per * D
        # Fewer KV heads than ranks: keep the KV head this rank's query heads belong to.
        head = (self.rank * (config.num_attention_heads // self.world)) // config.num_key_value_groups
        return head * D, (head + 1) * D

    def shard_shape(self, name: str, shape: tuple[int, ...], config) -> tuple[int, ...]:
        spec = self.index(name, shape, config)
        if spec is None:
            return shape
        dim, ranges = spec
        out = list(shape)
        out[dim] = sum(b - a for a, b in ranges)
        return tuple(out)

    def slice(self, name: str, tensor_or_slice, shape: tuple[int, ...], config) -> torch.Tensor:
        """This rank's part of a full tensor, or of a safetensors slice (reading only those bytes)."""
        spec = self.index(name, shape, config)
        if spec is None:
            return tensor_or_slice[:] if not isinstance(tensor_or_slice, torch.Tensor) else tensor_or_slice
        dim, ranges = spec
        parts = [tensor_or_slice[a:b] if dim == 0 else tensor_or_slice[:, a:b] for a, b in ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def check_divisible(config, world: int) -> None:
    """Every reason a split cannot work, raised on every rank before any communication (so nothing hangs)."""
    problems = []
    if config.num_attention_heads % world:
        problems.append(f"num_attention_heads={config.num_attention_heads} is not divisible by {world} ranks")
    kv = config.num_key_value_heads
    if kv >= world and kv % world:
        problems.append(f"num_key_value_heads={kv} is not divisible by {world} ranks")
    if kv < world and world % kv:
        problems.append(f"{world} ranks is not a multiple of num_key_value_heads={kv}")
    if config.intermediate_size % world:
        problems.append(f"intermediate_size={config.intermediate_size} is not divisible by {world} ranks")
    if problems:
        raise ParallelError("cannot split this model for tensor parallelism: " + "; ".join(problems)
                            + f". Choose a tp_size that divides them (tp_size={world} was asked)")


def init_tensor_parallel(tp_size: int | None) -> TensorParallel:
    """Join (or start) the torchrun process group; returns this rank's place in it."""
    if not dist.is_available():
        raise ParallelError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ParallelError("tp_size needs a torch.distributed job: launch with torchrun --nproc-per-node N")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        # Tear the group down before the interpreter does: a gloo group left to static destructors at exit can
        # abort the process ("terminate called without an active exception", seen on a loaded machine).
        atexit.register(_leave_process_group)
    world = dist.get_world_size()
    if tp_size is not None and tp_size != world:
        raise ParallelError(f"tp_size={tp_size} but the job has {world} processes; they must match")
    return TensorParallel(dist.get_rank(), world)


def _leave_process_group() -> None:
    if dist.is_initialized():  # no barrier: a rank that failed must not keep the others waiting at exit
        dist.destroy_process_group()


def shard_meta_model(model: nn.Module, tp: TensorParallel) -> None:
    """Replace each meta parameter by a meta parameter of this rank's shard shape."""
    config = model.config
    for name, param in list(model.named_parameters()):
        shape = tp.shard_shape(name, tuple(param.shape), config)
        if shape != tuple(param.shape):
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf,
                    nn.Parameter(torch.empty(shape, device="meta", dtype=param.dtype), requires_grad=False))
    for name, module in model.named_modules():
        if hasattr(module, "qkv_sizes"):  # where the fused projection's output splits, on this rank
            full = (sum(module.qkv_sizes), config.hidden_size)
            module.qkv_sizes = [b - a for a, b in tp.index(f"{name}.qkv_proj.weight", full, config)[1]]


def add_communication(model: nn.Module, tp: TensorParallel) -> None:
    """All-reduce after row-parallel layers and the vocabulary-split embedding; all-gather the logits."""
    config = model.config

    def all_reduce(module, inputs, output):
        dist.all_reduce(output)
        return output

    for name, module in model.named_modules():
        if name.endswith(("self_attn.o_proj", "mlp.down_proj")):
            module.register_forward_hook(all_reduce)
    embed = model.get_input_embeddings()
    spec = tp.index("model.embed_tokens.weight", (config.vocab_size, config.hidden_size), config)
    if spec is not None:
        start, stop = spec[1][0]

        def embed_local(module, args):
            (ids,) = args
            local = ids - start
            outside = (local < 0) | (local >= stop - start)
            module._outside = outside
            return (local.masked_fill(outside, 0),)

        def embed_sum(module, inputs, output):
            output = output.masked_fill(module._outside[..., None], 0)
            dist.all_reduce(output)
            return output

        embed.padding_idx = None  # the padding row lives on one rank only; nothing trains here anyway
        embed.register_forward_pre_hook(embed_local)
        embed.register_forward_hook(embed_sum)
    head = getattr(model, "lm_head", None)
    if head is not None and tp.index("lm_head.weight", (config.vocab_size, config.hidden_size), config) is not None:
        if config.tie_word_embeddings:
            head.weight = embed.weight

        def gather_logits(module, inputs, output):
            parts = [torch.empty_like(output) for _ in range(tp.world)]
            dist.all_gather(parts, output.contiguous())
            return torch.cat(parts, dim=-1)

        head.register_forward_hook(gather_logits)

    def sync_tokens(tokens: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tokens, src=0)  # every rank continues with rank 0's choice
        return tokens

    model.tp_sync_tokens = sync_tokens
    model.tensor_parallel = tp
