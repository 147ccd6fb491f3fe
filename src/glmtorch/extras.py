"""Optional packages: which glmtorch extra brings each one, and the one-line error when a feature needs one that is
missing. The base install (torch, safetensors, tokenizers, jinja2, tqdm, ninja, fastapi, uvicorn, numpy; tokenizers brings
huggingface_hub) loads, chats,
generates, converts to safetensors, trains and serves; everything else is imported here, lazily, by name."""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (pip extra, what the package is for). One table: the CLI's catch-all reads it too.
EXTRAS: dict[str, tuple[str, str]] = {
    "gguf": ("gguf", "GGUF files (llama.cpp)"),
    "sentencepiece": ("sentencepiece", "ChatGLM2/3 SentencePiece tokenizers"),
    "google.protobuf": ("sentencepiece", "ChatGLM2/3 SentencePiece tokenizers"),
    "huggingface_hub": ("hub", "Hugging Face hub ids"),
    "httpx": ("bench", "glmtorch bench-serve"),
    "matplotlib": ("bench", "benchmark and loss-curve charts"),
    "transformers": ("bench", "the transformers side of glmtorch bench"),
    "fastapi": ("serve", "glmtorch serve"),
    "uvicorn": ("serve", "glmtorch serve"),
    "prometheus_client": ("serve", "glmtorch serve's /metrics"),
    "llguidance": ("constrain", "constrained output (response_format, JSON schemas, required tool calls)"),
}


class MissingDependency(ImportError):
    """A feature needs an optional package that is not installed; the message is one line naming the extra."""


def install_hint(module: str) -> str | None:
    """`pip install 'glmtorch[extra]'` for an optional package's import name (or a submodule of one)."""
    for name, (extra, _) in EXTRAS.items():
        if module == name or module.startswith(name + "."):
            return f"pip install 'glmtorch[{extra}]'"
    return None


def missing_message(module: str, feature: str | None = None) -> str:
    top = next((n for n in EXTRAS if module == n or module.startswith(n + ".")), module)
    what = feature or EXTRAS.get(top, ("", "this feature"))[1]
    hint = install_hint(module) or f"pip install {top.split('.')[0]}"
    return f"{what} needs the {top.split('.')[0]!r} package, which is not installed: {hint}"


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import an optional package, or raise MissingDependency saying which extra brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module != e.name and not module.startswith(e.name + "."):
            raise  # the package is there but one of its own dependencies is broken: show the real error
        raise MissingDependency(missing_message(module, feature)) from None
