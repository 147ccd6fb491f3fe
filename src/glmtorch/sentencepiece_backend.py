"""ChatGLM2/3's tokenizer: a SentencePiece model (THUDM's `tokenizer.model`) with special tokens numbered after
its vocabulary, behind the small part of the `tokenizers.Tokenizer` interface that GlmTokenizer uses.

Needs the `sentencepiece` package (optional: only ChatGLM2/3 checkpoints use it).
"""

from __future__ import annotations

import copy
import re
import shutil
from dataclasses import dataclass

from .extras import require

CHATGLM3_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                           "<|observation|>")


@dataclass
class Encoding:
    ids: list[int]
    offsets: list[tuple[int, int]]
    tokens: list[str]


@dataclass
class SpecialToken:
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False


def is_sentencepiece_model(path: str) -> bool:
    """THUDM ships tiktoken-style text for GLM-4 and a binary SentencePiece protobuf for ChatGLM2/3."""
    with open(path, "rb") as f:
        head = f.read(256)
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return True
    return not all(c.isprintable() or c in "\r\n\t" for c in text)  # protobuf is binary from its first byte


class SentencePieceBackend:
    def __init__(self, path: str, special_tokens=CHATGLM3_SPECIAL_TOKENS) -> None:
        spm = require("sentencepiece", f"{path} is a SentencePiece model (ChatGLM2/3); reading it")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from None
        self.n = self.sp.vocab_size()
        self.special = {t: self.n + i for i, t in enumerate(special_tokens)}
        self.special_by_id = {i: t for t, i in self.special.items()}
        self.split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)) + ")")

    plain = False  # True in without_special_tokens()'s view

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        ids, offsets, tokens = [], [], []
        position = 0
        for segment in self.split.split(text):
            if not segment:
                continue
            if segment in self.special and not self.plain:
                ids.append(self.special[segment])
                offsets.append((position, position + len(segment)))
                tokens.append(segment)
            else:
                encoded = segment.encode("utf-8")
                proto = self.sp.encode(segment, out_type="proto")
                for piece in proto.pieces:  # begin/end are byte offsets into the segment
                    start = len(encoded[:piece.begin].decode("utf-8", "ignore"))
                    end = len(encoded[:piece.end].decode("utf-8", "ignore"))
                    ids.append(piece.id)
                    offsets.append((position + start, position + end))
                    tokens.append(piece.piece)
            position += len(segment)
        return Encoding(ids, offsets, tokens)

    def without_special_tokens(self) -> "SentencePieceBackend":
        """A view of this tokenizer that encodes control-token spellings as ordinary text (chat content)."""
        plain = copy.copy(self)
        plain.split = re.compile("(?!)")  # matches nothing: the text stays one segment
        plain.plain = True
        return plain

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[Encoding]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, run = [], []
        for i in ids:
            if i in self.special_by_id:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.special_by_id[i])
            elif 0 <= i < self.n:
                if skip_special_tokens and (self.sp.is_control(i) or self.sp.is_unknown(i)):
                    continue
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        if i in self.special_by_id:
            return self.special_by_id[i]
        return self.sp.id_to_piece(i) if 0 <= i < self.n else None

    def get_vocab(self) -> dict[str, int]:
        return {**{self.sp.id_to_piece(i): i for i in range(self.n)}, **self.special}

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.n + (len(self.special) if with_added_tokens else 0)

    def get_added_tokens_decoder(self) -> dict[int, SpecialToken]:
        return {i: SpecialToken(t) for i, t in self.special_by_id.items()}

    @property
    def eos_token(self) -> str:
        return self.sp.id_to_piece(self.sp.eos_id())

    def save(self, path: str) -> None:
        """Writes the SentencePiece model itself (ChatGLM2/3 checkpoints carry tokenizer.model, not tokenizer.json)."""
        shutil.copy(self.path, path)
