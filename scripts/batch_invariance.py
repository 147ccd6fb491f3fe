"""How much a request's greedy output depends on what it is batched with: N prompts of random tokens through
`glmtorch.LLM` together (the server's defaults) and each alone (one at a time, no prefix cache), on the shipped
demo model or a checkpoint, in a given dtype.

    python scripts/batch_invariance.py --dtype bfloat16 [--prompts 256] [--new-tokens 32] [--model DIR] [--blocks]

Prints one JSON object: how many requests' tokens differ from their run alone, and, over all of them, at which
generated position the chosen token's log-probability first differs in any bit (0: the prompt's pass already;
null: bit-equal throughout). Greedy tokens flip only where two candidates are closer than the rounding that
differs; the log-probabilities show the rounding itself.

--blocks lays every product's weight out in the kernels' blocks of 16 rows (a tied LM head gets a copy of its own)
and has every prefill read the pool in place (the tiles, or a row at a time for a run too short for them): the
layout whose sums are the same chain at every row count. With it, on a CPU the kernels build for, a request's
tokens and log-probabilities come out the same bits together as alone, for prompts that share no cached prefix."""

import argparse
import collections
import json
import os

import torch

import glmtorch
from glmtorch.cpuinfo import cpu_description
from glmtorch.serve.engine import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=glmtorch.DEMO_MODEL)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--blocks", action="store_true",
                   help="every weight in the kernels' blocks, every prefill reading the pool in place")
    args = p.parse_args()

    model = glmtorch.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    if args.blocks:
        from glmtorch.fastpath import pack_weights

        os.environ["GLMTORCH_PACK"], os.environ["GLMTORCH_PREFILL_ATTENTION"] = "blocks", "in_place"
        if model.lm_head.weight is model.model.embed_tokens.weight:  # a tied head stays plain: give it its own
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        pack_weights(model, rows=args.prompts)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(args.model)
    g = torch.Generator().manual_seed(args.seed)
    vocab = min(model.config.vocab_size, len(tokenizer))
    prompts = [torch.randint(5, vocab, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True, logprobs=True)

    def run(llm, batch):
        return [(o.outputs[0].token_ids, [e["logprob"] for e in o.outputs[0].logprobs])
                for o in llm.generate(batch, params, use_tqdm=False)]

    together = run(glmtorch.LLM(model, tokenizer), prompts)
    one = glmtorch.LLM(model, tokenizer, max_num_seqs=1, prefix_caching=False)
    alone = [run(one, [q])[0] for q in prompts]
    differ = [i for i, (a, b) in enumerate(zip(together, alone)) if a[0] != b[0]]
    first_bits = collections.Counter(
        next((j for j, (x, y) in enumerate(zip(a[1], b[1])) if x != y), None) for a, b in zip(together, alone))
    print(json.dumps({
        "model": args.model, "dtype": args.dtype, "blocks": args.blocks, "cpu": cpu_description(),
        "prompts": args.prompts,
        "new_tokens": args.new_tokens, "tokens_differ": len(differ), "which": differ[:20],
        "first_differing_logprob_position": {str(k): v for k, v in sorted(first_bits.items(),
                                                                        key=lambda kv: (kv[0] is None, kv[0] or 0))},
    }))


if __name__ == "__main__":
    main()
