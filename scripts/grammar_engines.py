"""Which grammar engine should constrain glmtorch's output? Measures llguidance, xgrammar and outlines-core on a
GLM-4-sized vocabulary (151,552 byte-level BPE tokens, GLM-4's special tokens at its end; built here, the real one
is not on this machine): the time to compile a JSON schema, the time to compute one token mask while walking a
valid reply token by token, and how many schemas of glmtorch's test suite (tests/schemas.py) each compiles.

    python scripts/grammar_engines.py     # needs: pip install llguidance xgrammar outlines-core
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from schemas import SCHEMAS  # noqa: E402

from glmtorch.bench import glm_sized_tokenizer  # noqa: E402

VOCAB = 151552
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]}}, "required": ["name", "age", "tags", "address"]}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "email": "ada@math.org", "tags": ["red", "blue"],
            "address": {"city": "London", "zip": "W1"}}


def walk(tokens, compute_mask, consume) -> float:
    """Median seconds per token mask along the reply."""
    times = []
    for token in tokens:
        start = time.perf_counter()
        compute_mask()
        times.append(time.perf_counter() - start)
        consume(token)
    return statistics.median(times)


def bench_llguidance(backend, tokens, eos):
    import llguidance
    import llguidance.torch as lt

    start = time.perf_counter()
    tok = llguidance.LLTokenizer(backend.to_str(), n_vocab=VOCAB, eos_token=eos)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compile_s = time.perf_counter() - start
    mask = lt.allocate_token_bitmask(1, VOCAB)
    per_token = walk(tokens, lambda: lt.fill_next_token_bitmask(matcher, mask, 0), matcher.consume_token)
    assert not matcher.is_error(), matcher.get_error()
    compiled = 0
    for schema in SCHEMAS:
        m = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(schema), log_level=0)
        compiled += not m.is_error()
    return setup, compile_s, per_token, compiled


def bench_xgrammar(backend, tokens, eos):
    import torch
    import xgrammar as xgr

    start = time.perf_counter()
    encoded = [backend.id_to_token(i) or "" for i in range(VOCAB)]
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=VOCAB, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled_grammar = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - start
    matcher = xgr.GrammarMatcher(compiled_grammar)
    mask = xgr.allocate_token_bitmask(1, VOCAB)
    per_token = walk(tokens, lambda: matcher.fill_next_token_bitmask(mask), matcher.accept_token)
    compiled = 0
    for schema in SCHEMAS:
        try:
            compiler.compile_json_schema(json.dumps(schema))
            compiled += 1
        except Exception:  # noqa: BLE001 - counted
            pass
    del torch
    return setup, compile_s, per_token, compiled


def bench_outlines(backend, tokens, eos):
    import torch
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    byte_decoder = {c: b for b, c in zip(range(256), [])}
    del byte_decoder
    mapping: dict[str, list[int]] = {}
    for i in range(VOCAB):
        text = backend.decode([i])
        if i != eos and text:
            mapping.setdefault(text, []).append(i)
    vocabulary = Vocabulary(eos, mapping)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    compile_s = time.perf_counter() - start
    guide = Guide(index)
    mask = torch.zeros((VOCAB + 31) // 32, dtype=torch.int32)
    per_token = walk(tokens, lambda: guide.write_mask_into(mask.data_ptr(), mask.numel(), 4), guide.advance)
    compiled = 0
    for schema in SCHEMAS:
        try:
            build_regex_from_schema(json.dumps(schema))
            compiled += 1
        except Exception:  # noqa: BLE001 - counted
            pass
    return setup, compile_s, per_token, compiled


def main() -> None:
    backend = glm_sized_tokenizer(VOCAB).backend
    text = json.dumps(INSTANCE)
    tokens = backend.encode(text).ids
    eos = backend.token_to_id("<|endoftext|>")
    print(f"vocabulary {backend.get_vocab_size()} tokens; reply {len(text)} characters, {len(tokens)} tokens; "
          f"schema suite {len(SCHEMAS)} schemas\n")
    print("| engine | tokenizer setup | compile the schema | mask per token (median) | suite schemas compiled |")
    print("| --- | --- | --- | --- | --- |")
    for name, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar),
                        ("outlines-core", bench_outlines)):
        try:
            setup, compile_s, per_token, compiled = bench(backend, tokens, eos)
        except Exception as e:  # noqa: BLE001 - reported in the table
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
            continue
        print(f"| {name} | {setup:.2f} s | {1000 * compile_s:.1f} ms | {1e6 * per_token:.0f} us | "
              f"{compiled}/{len(SCHEMAS)} |")


if __name__ == "__main__":
    main()
