"""Perplexity of a model on a text file, scored the way llama.cpp's `llama-perplexity -c N` scores it: the text
is tokenized once, cut into chunks of N tokens, and only the predictions in the second half of each chunk count.
Run it and llama-perplexity on the same weights (a checkpoint and its `glmtorch convert ... .gguf` export) to
check that llama.cpp computes what glmtorch computes.

    python scripts/perplexity.py MODEL TEXT [--ctx 256]
"""

import argparse
import math

import torch

import glmtorch


def perplexity(model_path: str, text_path: str, n_ctx: int = 256) -> tuple[float, int]:
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(model_path)
    model = glmtorch.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with open(text_path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    chunks = len(ids) // n_ctx
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(chunks):
            x = torch.tensor([ids[c * n_ctx:(c + 1) * n_ctx]])
            logp = torch.log_softmax(model(x).logits[0].float(), dim=-1)
            targets = x[0, n_ctx // 2 + 1:]
            nll -= float(logp[n_ctx // 2:n_ctx - 1].gather(1, targets[:, None]).sum())
            count += len(targets)
    return math.exp(nll / count), chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("text")
    parser.add_argument("--ctx", type=int, default=256)
    args = parser.parse_args()
    ppl, chunks = perplexity(args.model, args.text, args.ctx)
    print(f"{args.model}: PPL = {ppl:.4f} over {chunks} chunks of {args.ctx} tokens")


if __name__ == "__main__":
    main()
