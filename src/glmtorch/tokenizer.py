"""`GlmTokenizer`: GLM-4's tokenizer over the `tokenizers` library.

It reads what real checkpoints ship: `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`),
or THUDM's original `tokenizer.model`, a tiktoken-style list of "base64(token bytes) rank" lines, which is
converted here into the same byte-level BPE (ranks become merges) with GLM-4's split pattern and special
tokens. Padding is on the left by default, as generation wants.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .chat import (THINK_CLOSE, THINK_OPEN, default_chat_template, defuse, normalize_messages, render_chat,
                   render_chat_spans)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TIKTOKEN_FILE = "tokenizer.model"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ONE_TOKEN_TEXTS = 1 << 18  # the most single-token texts a tokenizer keeps (a vocabulary of 151,552 fits)

# GLM-4's pre-tokenizer split (cl100k's), and its special tokens, numbered right after the ranks.
GLM4_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                       "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                       "<|begin_of_video|>", "<|end_of_video|>")


class TokenizerError(ValueError):
    """Tokenizer files that are missing or unreadable."""


class BatchEncoding(dict):
    """input_ids / attention_mask, by key or attribute; `.to(device)` moves every tensor."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (what ByteLevel BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


class TokenBytes(dict):
    """id -> the bytes a byte-level decoder makes of that token (b"" for an id it skips or does not know), each
    found on first use: a vocabulary of 151,552 ids is not walked at start."""

    BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}

    def __init__(self, backend, skipped: frozenset[int]) -> None:
        super().__init__()
        self.backend, self.skipped = backend, skipped

    def __missing__(self, token: int) -> bytes:
        text = None if token in self.skipped or token < 0 else self.backend.id_to_token(token)
        if text is None:
            piece = b""
        else:
            try:
                piece = bytes(self.BYTE_OF[c] for c in text)
            except KeyError:  # a character outside the byte alphabet: the decoder takes the token's own UTF-8
                piece = text.encode("utf-8")
        self[token] = piece
        return piece


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{path}:{number}: expected 'base64-token rank', got {line[:60]!r}; this is not "
                                     "a tiktoken-style GLM-4 tokenizer.model") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: token ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def tokenizer_from_tiktoken(path: str, special_tokens: Sequence[str] = GLM4_SPECIAL_TOKENS,
                            pattern: str = GLM4_SPLIT_PATTERN):
    """Build the equivalent `tokenizers.Tokenizer` from a tiktoken-style rank file.

    A token's rank is its merge priority, so each multi-byte token contributes the merges of its two parts
    (both already tokens), ordered by the rank of the token they make.
    """
    ranks = read_tiktoken_ranks(path)
    byte_char = _bytes_to_unicode()
    as_text = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((as_text(a), as_text(b)) for a, b in pairs)
    return byte_level_bpe(vocab, merges, special_tokens, pattern)


def byte_level_bpe(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None,
                   special_tokens: Sequence[str] = (), pattern: str = GLM4_SPLIT_PATTERN):
    """GLM-4's tokenizer pipeline, the one place it is built: split by `pattern`, byte-level BPE over `vocab` and
    `merges` (an empty model to train when None), byte-level decoding, `special_tokens` as control tokens.
    Used for THUDM's tiktoken files, GGUF's embedded vocabularies and training a new tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    model = models.BPE() if vocab is None else models.BPE(vocab, merges or [], fuse_unk=False, ignore_merges=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    if special_tokens:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, chat_template: str | None = None,
                        special_tokens: Sequence[str] = GLM4_SPECIAL_TOKENS) -> "GlmTokenizer":
    """Train a byte-level BPE tokenizer shaped like GLM-4's (its split pattern, its special tokens right after
    the learned vocabulary, <|endoftext|> as eos and pad, the GLM-4 chat template)."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    learned = vocab_size - len(special_tokens)
    if learned < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
                         f"{len(special_tokens)} special tokens and at least one merge")
    tok = byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=learned, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return GlmTokenizer(tok, chat_template=chat_template or default_chat_template())


class GlmTokenizer:
    def __init__(self, tokenizer, chat_template: str | None = None, eos_token: str | None = "<|endoftext|>",
                 pad_token: str | None = None, padding_side: str = "left", model_max_length: int | None = None,
                 name_or_path: str = "") -> None:
        self.backend = tokenizer
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.name_or_path = name_or_path
        self.eos_token = eos_token if eos_token is not None and self.backend.token_to_id(eos_token) is not None else None
        pad_token = pad_token or self.eos_token
        self.pad_token = pad_token if pad_token is not None and self.backend.token_to_id(pad_token) is not None else None
        if padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
        self._special_tokens: tuple[str, ...] | None = None
        self._plain_backend = None  # a copy of the backend that reads control tokens as text (chat content)

    # -- loading and saving ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "GlmTokenizer":
        from tokenizers import Tokenizer

        directory = _tokenizer_directory(path)
        settings = _read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE)) or {}
        json_path, tiktoken_path = os.path.join(directory, TOKENIZER_FILE), os.path.join(directory, TIKTOKEN_FILE)
        if os.path.isfile(json_path):
            try:
                backend = Tokenizer.from_file(json_path)
            except Exception as e:
                raise TokenizerError(f"{json_path}: cannot be read ({e}); the file is corrupt") from None
        elif os.path.isfile(tiktoken_path):
            from .sentencepiece_backend import SentencePieceBackend, is_sentencepiece_model

            if is_sentencepiece_model(tiktoken_path):  # ChatGLM2/3
                try:
                    backend = SentencePieceBackend(tiktoken_path)
                except ValueError as e:
                    raise TokenizerError(str(e)) from None
                settings.setdefault("eos_token", backend.eos_token)
                settings.setdefault("chat_template", default_chat_template("chatglm3"))
            else:
                backend = tokenizer_from_tiktoken(tiktoken_path)
        else:
            raise TokenizerError(f"{directory}: no {TOKENIZER_FILE} or {TIKTOKEN_FILE}; this checkpoint ships no "
                                 "tokenizer, pass the directory of one that does")
        template = settings.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        template_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
        if os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                template = f.read()
        if template is None and _model_type(directory) == "glm4":
            template = default_chat_template("glm4_0414")  # a GLM-4-0414 checkpoint without its template
        kwargs = dict(
            chat_template=template,
            eos_token=_token_text(settings.get("eos_token")) or "<|endoftext|>",
            pad_token=_token_text(settings.get("pad_token")),
            padding_side=settings.get("padding_side", "left"),
            model_max_length=settings.get("model_max_length"),
            name_or_path=os.fspath(path),
        )
        kwargs.update(overrides)
        return cls(backend, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        from .sentencepiece_backend import SentencePieceBackend

        written = TIKTOKEN_FILE if isinstance(self.backend, SentencePieceBackend) else TOKENIZER_FILE
        self.backend.save(os.path.join(directory, written))
        settings = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token, "pad_token": self.pad_token, "padding_side": self.padding_side,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                         "normalized": t.normalized, "single_word": t.single_word}
                for i, t in sorted(self.backend.get_added_tokens_decoder().items())},
        }
        if self.model_max_length:
            settings["model_max_length"] = self.model_max_length
        if self.chat_template:
            settings["chat_template"] = self.chat_template
            with open(os.path.join(directory, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
                f.write(self.chat_template)
        with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2, ensure_ascii=False)
        return [written, TOKENIZER_CONFIG_FILE] + ([CHAT_TEMPLATE_FILE] if self.chat_template else [])

    # -- ids -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.backend.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def stop_token_ids(self, eos_token_id: int | list[int] | None = None) -> set[int]:
        """GLM-4 ends a turn with any of <|endoftext|>, <|user|>, <|observation|>: all three stop."""
        ids = {i for i in (self.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])) if i is not None}
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        if eos_token_id is not None:
            ids.update([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        return ids

    # -- encode / decode -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], return_tensors: str | None = None, padding: bool | str = False,
                 truncation: bool = False, max_length: int | None = None, add_special_tokens: bool = True,
                 padding_side: str | None = None, return_attention_mask: bool = True) -> BatchEncoding:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a string or a list of strings")
        rows = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        if truncation:
            limit = max_length or self.model_max_length
            if limit:
                rows = [r[:limit] if (padding_side or self.padding_side) == "right" else r[-limit:] for r in rows]
        masks = [[1] * len(r) for r in rows]
        lengths = {len(r) for r in rows}
        if padding or (return_tensors and len(lengths) > 1):
            if not padding:
                raise ValueError("the texts have different lengths: pass padding=True to make a batch tensor")
            target = max_length if padding == "max_length" and max_length else max(lengths)
            if self.pad_token_id is None:
                raise ValueError("this tokenizer has no pad token; set tokenizer.pad_token first")
            side = padding_side or self.padding_side
            for i, row in enumerate(rows):
                fill = target - len(row)
                if side == "left":
                    rows[i], masks[i] = [self.pad_token_id] * fill + row, [0] * fill + masks[i]
                else:
                    rows[i], masks[i] = row + [self.pad_token_id] * fill, masks[i] + [0] * fill
        if return_tensors == "pt":
            out = BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long))
            if return_attention_mask:
                out["attention_mask"] = torch.tensor(masks, dtype=torch.long)
            return out
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' (PyTorch) is supported")
        out = BatchEncoding(input_ids=rows[0] if single else rows)
        if return_attention_mask:
            out["attention_mask"] = masks[0] if single else masks
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. skip_special_tokens drops control tokens, but never a reasoning model's <think> /
        </think> (tokenizers that make them special tokens would otherwise lose the tags that separate its
        thinking from its answer)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.decode_ids([int(i) for i in ids], skip_special_tokens)

    def decode_ids(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """decode() of a list of Python ints, as a streaming detokenizer calls it at every token: no conversions,
        and one token's text kept once decoded (the window before a stream's newest token is mostly one token)."""
        if len(ids) == 1:
            key = (ids[0], skip_special_tokens)
            text = self._one_token_texts.get(key)
            if text is None:
                text = self._decode_ids(ids, skip_special_tokens)
                if len(self._one_token_texts) < ONE_TOKEN_TEXTS:
                    self._one_token_texts[key] = text
            return text
        return self._decode_ids(ids, skip_special_tokens)

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens and self._skipped_ids is not None:
            ids, skip_special_tokens = [i for i in ids if i not in self._skipped_ids], False
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def _one_token_texts(self) -> dict[tuple[int, bool], str]:
        return {}

    def byte_pieces(self, skip_special_tokens: bool = False) -> "TokenBytes | None":
        """Each id's bytes, for a tokenizer whose decode() is the UTF-8 (errors replaced) of its tokens' bytes
        joined: a byte-level BPE (GLM-4's, as a tokenizer.json or converted from tiktoken), where the backend's
        ByteLevel decoder maps each token's characters back to bytes (a token with a character outside that
        alphabet, an added token written in another script, gives its own UTF-8) and skips what
        skip_special_tokens drops. A stream can then decode its tokens' bytes incrementally instead of decoding
        windows of tokens (StreamingDetokenizer; a streamed token's text in the demo model's 64-row burst 3.9 ->
        1.2 us, ~0.17 ms of a ~5 ms step over its 64 rows, AMD EPYC Zen 4). None for other tokenizers
        (SentencePiece's spaces depend on the token before)."""
        key = "_pieces_skipping" if skip_special_tokens else "_pieces"
        if key not in self.__dict__:  # (asked for by every request's stream: decided once)
            from tokenizers import decoders

            pieces = None
            if isinstance(getattr(self.backend, "decoder", None), decoders.ByteLevel):
                skipped: frozenset[int] = frozenset()
                if skip_special_tokens:
                    skipped = self._skipped_ids if self._skipped_ids is not None else frozenset(
                        i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)
                pieces = TokenBytes(self.backend, skipped)
            self.__dict__[key] = pieces
        return self.__dict__[key]

    @functools.cached_property
    def _skipped_ids(self) -> frozenset[int] | None:
        """The control tokens skip_special_tokens drops, when the tokenizer makes the thinking tags special too
        (else None: the backend's own skipping is right)."""
        if not hasattr(self.backend, "get_added_tokens_decoder"):
            return None
        special = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        if not set(special.values()) & {THINK_OPEN, THINK_CLOSE}:
            return None
        return frozenset(i for i, text in special.items() if text not in (THINK_OPEN, THINK_CLOSE))

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # -- chat ------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                            tokenize: bool = True, add_generation_prompt: bool = False,
                            return_tensors: str | None = None, return_dict: bool = False,
                            chat_template: str | None = None, **template_kwargs: Any):
        """Render a conversation with the checkpoint's template (GLM-4's built-in one if it has none).
        tokenize=False gives the text; otherwise ids (no extra special tokens: the template writes them)."""
        template = chat_template or self.chat_template or default_chat_template()
        kwargs = dict(tools=tools, add_generation_prompt=add_generation_prompt, special_tokens=self.special_tokens,
                      eos_token=self.eos_token, pad_token=self.pad_token, **template_kwargs)
        if not tokenize:  # text: whoever tokenises it again reads control tokens wherever they are spelled
            return render_chat(template, messages, **kwargs)
        text, spans = render_chat_spans(template, messages, **kwargs)
        if spans is None:  # the template rewrote content: it cannot be traced, so it must not spell control tokens
            text, spans = render_chat(template, defuse(messages, self.special_tokens), **kwargs), []
        ids = self.encode_with_plain_spans(text, spans)
        if return_tensors == "pt":
            encoded = BatchEncoding(input_ids=torch.tensor([ids], dtype=torch.long),
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        elif return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' (PyTorch) is supported")
        else:
            encoded = BatchEncoding(input_ids=ids, attention_mask=[1] * len(ids))
        return encoded if return_dict else encoded["input_ids"]

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for: a text of n bytes is at least n / max_token_bytes tokens,
        which lets a server turn away an over-long prompt before tokenising it."""
        if getattr(self, "_max_token_bytes", None) is None:
            vocab = self.backend.get_vocab() if hasattr(self.backend, "get_vocab") else {}
            # byte-level BPE writes one character per byte; SentencePiece pieces are UTF-8 text (an upper bound)
            longest = max((len(t.encode("utf-8")) for t in vocab), default=0)
            self._max_token_bytes = max(longest, max((len(t.encode("utf-8")) for t in self.special_tokens), default=1),
                                        16 if not vocab else 1)
        return self._max_token_bytes

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The control tokens' texts, longest first (the order they are matched in)."""
        if self._special_tokens is None:
            texts = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
            self._special_tokens = tuple(sorted(texts, key=len, reverse=True))
        return self._special_tokens

    def encode_with_plain_spans(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """Ids of `text` where control tokens are read only outside `spans`; inside them their spelling is plain
        text. The tokenizer itself splits on control tokens first and encodes the pieces between them one by
        one, so splitting here and encoding the pieces with control tokens turned off gives the same ids as
        encode() wherever the spans spell none."""
        if self._plain_backend is None:
            self._plain_backend = self.backend.without_special_tokens() if hasattr(
                self.backend, "without_special_tokens") else _plain_copy(self.backend)
        ids: list[int] = []
        position = 0

        def add_plain(piece: str) -> None:
            if piece:
                ids.extend(self._plain_backend.encode(piece, add_special_tokens=False).ids)

        if self.special_tokens:
            pattern = re.compile("|".join(re.escape(t) for t in self.special_tokens))
            for match in pattern.finditer(text):
                if any(start < match.end() and match.start() < end for start, end in spans):
                    continue  # spelled inside content: stays text
                add_plain(text[position:match.start()])
                ids.append(self.backend.token_to_id(match.group()))
                position = match.end()
        add_plain(text[position:])
        return ids

    def encode_conversation(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                            end_token: str = "<|endoftext|>") -> tuple[list[int], list[bool], list[int]]:
        """Token ids of a rendered conversation, which of them the assistant wrote, and each token's length in
        characters: what training needs to put the loss on assistant turns only.

        An assistant turn counts from just after its `<|assistant|>` to the token that ends it (the next role
        token, or `end_token` appended after a final assistant turn), so the model also learns to stop.
        """
        template = self.chat_template or default_chat_template()
        messages = normalize_messages(messages)
        text = render_chat(template, messages, tools=tools)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(render_chat(template, messages[:i], tools=tools, add_generation_prompt=True)) if i else None
            end = len(render_chat(template, messages[:i + 1], tools=tools))
            if start is None or not text.startswith(render_chat(template, messages[:i + 1], tools=tools)):
                raise ValueError("the chat template does not render a conversation as a growing prefix, so "
                                 "assistant turns cannot be located for loss masking")
            spans.append((start, end))
        if messages[-1]["role"] == "assistant":
            text += end_token
        encoding = self.backend.encode(text, add_special_tokens=False)
        ids, targets, chars = encoding.ids, [], []
        special = set(self.all_special_ids)
        for token, (start, end) in zip(ids, encoding.offsets):
            chars.append(0 if token in special else end - start)  # markup is not text
            # a token is the assistant's if it lies in a span, or is the first token after one (the stop token)
            targets.append(any(s <= start < e or (start == e and end > e) for s, e in spans))
        return ids, targets, chars


def _tokenizer_directory(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    from .checkpoint.resolve import resolve_checkpoint

    try:
        return resolve_checkpoint(path, need_weights=False)
    except ValueError as e:
        raise TokenizerError(str(e)) from None


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _model_type(directory: str) -> str | None:
    """The model_type of the checkpoint beside a tokenizer, if it says (a broken config.json is the loader's
    error to report, not the tokenizer's)."""
    try:
        config = _read_json(os.path.join(directory, "config.json"))
    except TokenizerError:
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _plain_copy(backend):
    """A `tokenizers.Tokenizer` like `backend` that encodes control-token spellings as ordinary text."""
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.encode_special_tokens = True
    return plain
