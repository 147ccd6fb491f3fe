"""One pass over a checkpoint's tensors, as the loader and the converter both take them.

Each stored tensor is mapped through its format's table, read (only this rank's slice of it under tensor
parallelism), transformed, and, where the table says so, joined with the other parts of a stacked parameter
(qkv_proj = [q | k | v]); what comes out is (target name, tensor, source names), checked against the names and
shapes the consumer expects. Every problem (a name no rule knows, a tensor nobody expects, a duplicate, a wrong
shape, a missing part or tensor) is collected and raised at the end as one CheckpointError, so a user sees all of
them at once.

    stream = CheckpointStream(files, fmt, config, expected_shapes, stack=True)
    for name, tensor, source in stream:
        ...                      # assign into a model, or write into a shard
    stream.finish()              # raises CheckpointError listing every problem (and what is missing)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..config import GlmConfig
from .formats import WeightFormat, part_name, split_stacked, stacked_parts
from .resolve import CheckpointError
from .safetensors_io import iter_tensor_names, open_safetensors, read_tensor

# shard(unstacked name, a tensor or a file slice, its full shape) -> this rank's piece (glmtorch.parallel)
Shard = Callable[[str, object, tuple], torch.Tensor]


class CheckpointStream:
    """Iterate a checkpoint's tensors as (target, tensor, source).

    expected: target name -> shape, for every tensor the consumer wants (the model's parameters for the loader,
        with stacked parameters whole; the transformers names for the converter).
    stack: join `name#part` targets into `name` (the loader); otherwise they come out under their own unstacked
        names (part_name: the converter writes transformers' q_proj / k_proj / v_proj).
    rename: table name -> the consumer's name (a bare GlmModel drops "model.").
    skip: targets to leave out silently (a tied LM head, the head of another model class).
    shard: cut each tensor to this rank's piece before it is checked (tensor parallelism); untransformed tensors
        are then read from the file as that slice only.
    keep_open: keep every file open (the loader, whose tensors may still view them); otherwise one file at a time,
        which bounds the converter's memory to about one shard.
    """

    def __init__(self, files: list[str], fmt: WeightFormat, config: GlmConfig, expected: dict[str, tuple],
                 stack: bool = True, rename: Callable[[str], str] = lambda name: name,
                 skip: Callable[[str], bool] = lambda name: False, shard: Shard | None = None,
                 keep_open: bool = True, desc: str = "Loading weights", progress: bool | None = None) -> None:
        self.files, self.fmt, self.config, self.expected = files, fmt, config, expected
        self.stack, self.rename, self.skip, self.shard, self.keep_open = stack, rename, skip, shard, keep_open
        self.desc, self.progress = desc, progress
        self.problems: list[str] = []
        self.done: dict[str, str] = {}  # target -> the stored name(s) it came from
        self.pending: dict[str, dict[str, tuple[torch.Tensor, str]]] = {}  # stacked target -> its parts so far

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        entries = list(iter_tensor_names(self.files))
        handles: dict[str, object] = {}
        for path, stored, _ in tqdm(entries, desc=self.desc, unit="tensor", disable=_quiet(self.progress)):
            mapped = self.fmt.map_name(stored)
            if mapped is None:
                self.problems.append(f"unexpected tensor {stored!r} (in {os.path.basename(path)}): the "
                                     f"{self.fmt.name} format has no such weight")
                continue
            names, transform = mapped
            targets = [self._final(self.rename(name)) for name in names]
            targets = [None if self.skip(t) else t for t in targets]
            if all(t is None for t in targets):
                continue  # dropped by the table, or by the consumer
            if path not in handles:
                if not self.keep_open:
                    handles.clear()
                handles[path] = open_safetensors(path)
            for target, part in zip(targets, self._read(handles[path], path, stored, targets, transform)):
                if target is not None:
                    yield from self._take(target, part, stored)

    def _final(self, name: str) -> str:
        return name if self.stack else part_name(name)

    def _read(self, handle, path: str, stored: str, targets: list, transform) -> tuple[torch.Tensor, ...]:
        if (self.shard is not None and transform is None and hasattr(handle, "get_slice")
                and self._known(targets[0])):
            # only this rank's rows / columns come off the disk (the plan knows a stacked part by its own name)
            return (self.shard(part_name(targets[0]), handle.get_slice(stored), handle.shape(stored)),)
        tensor = read_tensor(handle, path, stored)
        parts = transform(tensor, self.config) if transform else (tensor,)
        if self.shard is not None:
            parts = tuple(self.shard(part_name(t), p, tuple(p.shape)) if t is not None and self._known(t) else p
                          for t, p in zip(targets, parts))
        return parts

    def _known(self, target: str) -> bool:
        return split_stacked(target)[0] in self.expected

    def _take(self, target: str, part: torch.Tensor, stored: str) -> Iterator[tuple[str, torch.Tensor, str]]:
        name, piece = split_stacked(target)
        if name not in self.expected:
            self.problems.append(f"unexpected tensor {stored!r}: the model has no parameter {name!r}")
            return
        source = stored
        if piece is not None:  # one part of a stacked parameter: kept until all its parts are read
            got = self.pending.setdefault(name, {})
            unstacked = part_name(target)
            if piece in got:
                self.problems.append(f"{unstacked!r} is given twice, by {got[piece][1]!r} and {stored!r}")
                return
            if tuple(part.shape[1:]) != tuple(self.expected[name][1:]):
                self.problems.append(f"tensor {stored!r} has shape {tuple(part.shape)}, but {unstacked!r} needs "
                                     f"{tuple(self.expected[name][1:])} per row (config.json does not match the "
                                     "weights)")
                return
            got[piece] = (part, stored)
            order = stacked_parts(name)
            if len(got) < len(order):
                return
            part = torch.cat([got[p][0] for p in order], dim=0)
            source = " + ".join(got[p][1] for p in order)
            del self.pending[name]
        if name in self.done:
            self.problems.append(f"{name!r} is given twice, by {self.done[name]!r} and {source!r}")
            return
        if tuple(part.shape) != tuple(self.expected[name]):
            self.problems.append(f"tensor {source!r} has shape {tuple(part.shape)}, but {name!r} needs "
                                 f"{tuple(self.expected[name])} (config.json does not match the weights)")
            return
        self.done[name] = source
        yield name, part, source

    def missing(self, optional: Callable[[str], bool] = lambda name: False) -> list[str]:
        """Expected tensors the checkpoint did not give (those `optional` accepts left out)."""
        return [n for n in self.expected if n not in self.done and n not in self.pending and not optional(n)]

    def finish(self, what: str, optional: Callable[[str], bool] = lambda name: False) -> None:
        """Raise one CheckpointError naming every problem met and every missing tensor; `what` says what the
        checkpoint was being read for."""
        problems = list(self.problems)
        for name, got in self.pending.items():
            problems.append("missing tensors: " + ", ".join(part_name(f"{name}#{p}") for p in stacked_parts(name)
                                                            if p not in got))
        missing = self.missing(optional)
        if missing:
            problems.append(f"missing tensors: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if problems:
            raise CheckpointError(f"{what}:\n  " + "\n  ".join(problems[:30]))


def _quiet(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None hides the bar when stderr is not a terminal; progress=True / False forces it."""
    return None if progress is None else not progress
