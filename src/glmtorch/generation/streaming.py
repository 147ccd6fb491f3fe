"""Streaming text: an incremental detokenizer that never emits half a character, a streamer for
`generate(streamer=...)` usable from another thread, and `stream_text` for the CLI and server, which holds
back text that may be the start of a stop string."""

from __future__ import annotations

import codecs
import queue
from collections.abc import Iterator

import torch

from .stopping import find_stop, partial_stop_length


class StreamingDetokenizer:
    """Turns tokens into text pieces as they arrive.

    Where the tokenizer's decode() is the UTF-8 of its tokens' bytes joined (a byte-level BPE, GLM-4's:
    GlmTokenizer.byte_pieces), each token's bytes go through an incremental UTF-8 decoder, which holds back an
    incomplete character. Otherwise it decodes a short window (prefix_offset:) and emits what follows the
    already-emitted part once it no longer ends in U+FFFD (an incomplete UTF-8 sequence); the window keeps
    tokenizers whose pieces depend on their left neighbour (SentencePiece spaces) right. The window before the
    newest tokens is decoded once and kept, not again with every token that does not yet complete a character.
    Either way the pieces joined are decode() of all the tokens.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        # glmtorch's Tokenizer takes a list of ints as they are; others get it through decode()
        self.decode_list = getattr(tokenizer, "decode_ids", None) or tokenizer.decode
        self.skip_special_tokens = skip_special_tokens
        pieces = getattr(tokenizer, "byte_pieces", None)
        self.pieces = pieces(skip_special_tokens) if pieces is not None else None
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self.pieces is not None else None
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.prefix = ""  # the text of tokens[prefix_offset:read_offset]

    def _decode(self, ids: list[int]) -> str:
        return self.decode_list(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def add_token(self, token: int) -> str:
        """Add one token; return the new text it completes (possibly "")."""
        if self.pieces is not None:
            return self.utf8.decode(self.pieces[int(token)])
        self.tokens.append(int(token))
        current = self._decode(self.tokens[self.prefix_offset:])
        if len(current) > len(self.prefix) and not current.endswith("\ufffd"):
            piece = current[len(self.prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            self.prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
            return piece
        return ""

    def finalize(self) -> str:
        """Whatever is left, even an incomplete character (as the replacement character)."""
        if self.utf8 is not None:
            return self.utf8.decode(b"", final=True)  # (and the decoder starts afresh)
        current = self._decode(self.tokens[self.prefix_offset:])
        piece = current[len(self.prefix):] if len(current) > len(self.prefix) else ""
        self.prefix_offset = self.read_offset = len(self.tokens)
        self.prefix = ""
        return piece


class TextIteratorStreamer:
    """Pass to `generate(streamer=...)` running in a thread; iterate it elsewhere to get text pieces.

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        Thread(target=model.generate, kwargs=dict(input_ids=ids, streamer=streamer)).start()
        for piece in streamer: print(piece, end="")
    """

    _END = object()

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.detokenizer = StreamingDetokenizer(tokenizer, skip_special_tokens)
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist() if isinstance(value, torch.Tensor) else list(value)
        if self.skip_prompt and not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in ids:
            piece = self.detokenizer.add_token(token)
            if piece:
                self.queue.put(piece)

    def end(self) -> None:
        piece = self.detokenizer.finalize()
        if piece:
            self.queue.put(piece)
        self.queue.put(self._END)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self.queue.get(timeout=self.timeout)
            if item is self._END:
                return
            yield item


class TextStream:
    """One generated sequence as text, token by token: what `stream_text` and the server both stream.

    `add(token)` returns (text now final, finish reason or None): an end-of-sequence id (unless `ignore_eos`) or
    a completed stop string finishes with "stop"; the stop string itself is never shown, and text that could be
    the start of one is held back until it is known not to be. `finish()` flushes what is left when the length
    limit ends the sequence. Only the text not shown yet is searched: what was shown holds no stop string, nor the
    start of one at its end, so a stop string can only begin after it (a token costs the same however long the
    text grew)."""

    def __init__(self, tokenizer, stop_strings: list[str] | None = None, eos_ids=(), ignore_eos: bool = False) -> None:
        self.detok = StreamingDetokenizer(tokenizer)
        self.stops = list(stop_strings or [])
        self.eos = set() if ignore_eos else set(eos_ids)
        self.held = ""  # text made but not returned yet: the possible start of a stop string

    def add(self, token: int) -> tuple[str, str | None]:
        if token in self.eos:
            return self.finish()[0], "stop"
        piece = self.detok.add_token(token)
        if not self.stops:
            return piece, None
        return self._release(self.held + piece, final=False)

    def finish(self) -> tuple[str, str | None]:
        """(the rest of the text, "stop" if finalizing completed a stop string else None)."""
        return self._release(self.held + self.detok.finalize(), final=True)

    def _release(self, text: str, final: bool) -> tuple[str, str | None]:
        cut = find_stop(text, self.stops) if self.stops else -1
        if cut >= 0:
            self.held = ""
            return text[:cut], "stop"
        keep = 0 if final else partial_stop_length(text, self.stops)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], None


def stream_text(model, tokenizer, input_ids: torch.Tensor, stop_strings: list[str] | None = None,
                response_format=None, **generate_kwargs) -> Iterator[tuple[str, str | None]]:
    """Generate for one prompt, yielding (text piece, None) as text becomes final, then ("", finish_reason)
    with finish_reason "stop" (an end-of-sequence token or stop string) or "length".

    Text that could be the start of a stop string is held back until it is known not to be one, and the stop
    string itself is never shown. `response_format` constrains the output as in generate().
    """
    from .loop import decode_tokens
    from .sampling import make_generator

    base = model.generation_config
    generator = generate_kwargs.pop("generator", None)
    seed = generate_kwargs.pop("seed", None)
    assistant_model = generate_kwargs.pop("assistant_model", None)
    config = base.updated(**generate_kwargs)
    input_ids, attention_mask = model._check_prompt(input_ids, None, config)
    if input_ids.shape[0] != 1:
        raise ValueError("stream_text streams one prompt at a time")
    max_new_tokens = model._room_for_new_tokens(input_ids.shape[1], config)
    generator = generator or make_generator(seed, input_ids.device)
    text = TextStream(tokenizer, stop_strings, config.eos_token_ids)
    constraints = model._constraints(response_format, tokenizer, config)
    for tokens, _, _ in decode_tokens(model, input_ids, attention_mask, config, max_new_tokens, generator,
                                      constraints=constraints, assistant_model=assistant_model):
        piece, reason = text.add(int(tokens[0]))
        if piece:
            yield piece, None
        if reason:
            yield "", reason
            return
    piece, reason = text.finish()
    if piece:
        yield piece, None
    yield "", reason or "length"
