"""A random-weight checkpoint of a `glmtorch bench` preset, with a tokenizer that gives every id a word.

`glmtorch bench-serve` times the first and following pieces of text; with random weights and a small real
tokenizer most generated ids would decode to nothing, so its time-to-first-token figures would mean nothing.
Here every id decodes to a word (the benchmark prompt's words first, then "w<id>"), the GLM-4 special tokens
sit at the end of the vocabulary, and the built-in GLM-4 chat template comes along.

    python scripts/make_bench_checkpoint.py small /tmp/small-serve [--dtype bfloat16]
"""

import argparse

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from glmtorch.bench import PRESETS, make_checkpoint
from glmtorch.serve.bench import WORDS
from glmtorch.chat import default_chat_template
from glmtorch.tokenizer import GLM4_SPECIAL_TOKENS, GlmTokenizer

FIRST_SPECIAL = 151329  # where GLM-4 puts <|endoftext|>, so the config's default eos ids mean the same here


def word_tokenizer(vocab_size: int) -> GlmTokenizer:
    words = ["[UNK]", "Request", ":"] + sorted(set(WORDS)) + [str(i) for i in range(2000)]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    first = FIRST_SPECIAL if vocab_size >= FIRST_SPECIAL + len(GLM4_SPECIAL_TOKENS) else vocab_size - len(GLM4_SPECIAL_TOKENS)
    words[first:first + len(GLM4_SPECIAL_TOKENS)] = GLM4_SPECIAL_TOKENS
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIAL_TOKENS])
    return GlmTokenizer(backend, chat_template=default_chat_template(), pad_token="<|endoftext|>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--arch", default="glm", choices=["glm", "glm4"])
    args = parser.parse_args()
    make_checkpoint(args.preset, args.out, getattr(torch, args.dtype), arch=args.arch)
    word_tokenizer(PRESETS[args.preset]["vocab_size"]).save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
