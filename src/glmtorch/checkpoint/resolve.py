"""Turn what the user passed (a directory or a hub id) into a local checkpoint directory."""

from __future__ import annotations

import os
import re

from ..extras import MissingDependency, require

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match the model."""


def resolve_checkpoint(path: str | os.PathLike, need_weights: bool = True) -> str:
    """A local directory with config.json. A hub id ("THUDM/glm-4-9b-chat-hf") is looked up in, or
    downloaded to, huggingface_hub's cache when that package is installed."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path}: the directory has no config.json, so it is not a model checkpoint; "
                                  "point at the directory that holds config.json and the *.safetensors files")
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file; pass the directory that "
                              "contains it")
    if not _HUB_ID.match(path) or path.startswith((".", "/")):
        raise CheckpointError(f"{path}: no such directory")
    return _from_hub(path, need_weights)


def _from_hub(repo_id: str, need_weights: bool) -> str:
    try:
        huggingface_hub = require("huggingface_hub", f"{repo_id}: no such local directory; fetching it as a hub id")
    except MissingDependency as e:  # also a CheckpointError: the path is what was wrong, most likely
        raise CheckpointError(f"{e} (or download it elsewhere and pass its directory)") from None
    patterns = WEIGHT_PATTERNS if need_weights else ["*.json", "*.jinja", "tokenizer*", "*.model"]
    try:  # the cache first: works offline and costs nothing
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        raise CheckpointError(
            f"{repo_id}: not a local directory, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}). If this machine is offline, download the checkpoint on one that is online "
            f"(huggingface-cli download {repo_id} --local-dir DIR), copy DIR here and pass DIR instead"
        ) from None
