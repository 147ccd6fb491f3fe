"""The JSON-schema suite (tests/schemas.py) on a model, greedy and sampled: how many replies ended within the token
limit, and whether every one that ended is valid for its schema (jsonschema). With --preset, a random-weight model
of a `glmtorch bench` preset and a tokenizer of GLM-4's size (glmtorch.bench.glm_sized_tokenizer).

    python scripts/schema_suite.py --preset small [--max-new-tokens 64]
    python scripts/schema_suite.py CHECKPOINT
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

import glmtorch
from glmtorch.bench import glm_sized_tokenizer, make_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from schemas import SCHEMAS  # noqa: E402


def main() -> None:
    import jsonschema

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.preset:
        path = make_checkpoint(args.preset, tempfile.mkdtemp(), torch.float32)
        model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
        tokenizer = glm_sized_tokenizer(model.config.vocab_size)
        ids = torch.tensor([tokenizer.encode("Reply in JSON.")])
    else:
        model = glmtorch.AutoModelForCausalLM.from_pretrained(args.model)
        tokenizer = glmtorch.AutoTokenizer.from_pretrained(args.model)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "Reply in JSON."}],
                                            add_generation_prompt=True, return_tensors="pt")
    stops = set(model.generation_config.eos_token_id or []) or {tokenizer.eos_token_id}
    ended = valid = 0
    start = time.perf_counter()
    for i, schema in enumerate(SCHEMAS):
        for sampled in (False, True):
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=sampled, seed=i,
                                 eos_token_id=sorted(stops), response_format=schema, tokenizer=tokenizer)
            new = out[0, ids.shape[1]:].tolist()
            if not any(t in stops for t in new):
                continue
            ended += 1
            text = tokenizer.decode(new[:next(j for j, t in enumerate(new) if t in stops)])
            try:
                jsonschema.validate(json.loads(text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as e:
                print(f"INVALID schema {i} sampled={sampled}: {text[:80]!r} ({str(e)[:80]})")
    total = 2 * len(SCHEMAS)
    print(f"{len(SCHEMAS)} schemas, greedy and sampled ({total} replies, at most {args.max_new_tokens} tokens): "
          f"{ended} ended, {valid} of them valid ({100 * valid / max(ended, 1):.0f}%); "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
