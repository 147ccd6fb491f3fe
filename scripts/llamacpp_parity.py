"""Does llama.cpp run what `glmtorch convert` writes? Exports a checkpoint to GGUF (F32 and Q8_0), then compares
llama.cpp with glmtorch on the same weights: perplexity (`llama-perplexity` against scripts/perplexity.py, same
text, same chunks) and greedy continuation of a prompt (`llama-simple` against glmtorch's generate). Prints a
markdown table. Needs a llama.cpp build (../shared/peers/llamacpp/build.sh, plus its llama-simple target).

    python scripts/llamacpp_parity.py CHECKPOINT TEXT --llama-cpp DIR [--glm4-demo] [--ctx 256] [--tokens 32]

--glm4-demo first makes a GLM-4-0414-shaped model of CHECKPOINT (a `glm` one, the demo model say): its weights
plus the two sandwich norms per layer, each set to the per-channel RMS its sub-layer's output has on TEXT (so that
the model still writes text rather than noise) times 1 + N(0, 0.05) (so that a converter or runtime that drops or
swaps them is caught), and runs the comparison on that.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

import glmtorch
from glmtorch.checkpoint.gguf import write_gguf

sys.path.insert(0, os.path.dirname(__file__))
from perplexity import perplexity  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light"


def output_rms(model, tokenizer, text_path: str) -> dict[str, torch.Tensor]:
    """Per-channel RMS of every layer's attention and MLP output on the first 512 tokens of the text."""
    with open(text_path, encoding="utf-8") as f:
        ids = torch.tensor([tokenizer.encode(f.read())[:512]])
    found, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for module, name in ((layer.self_attn, "post_self_attn_layernorm"), (layer.mlp, "post_mlp_layernorm")):
            def keep(_, __, out, key=f"model.layers.{i}.{name}.weight"):
                h = out[0] if isinstance(out, tuple) else out
                found[key] = h.pow(2).mean(dim=(0, 1)).sqrt()
            hooks.append(module.register_forward_hook(keep))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return found


def glm4_demo(src: str, dst: str, text_path: str) -> str:
    """`src`'s weights in a Glm4ForCausalLM, the sandwich norms set to its sub-layers' output RMS, perturbed."""
    model = glmtorch.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scales = output_rms(model, glmtorch.AutoTokenizer.from_pretrained(src), text_path)
    config = glmtorch.Glm4Config.from_dict({k: v for k, v in model.config.to_dict().items() if k != "model_type"})
    glm4 = glmtorch.Glm4ForCausalLM.from_config(config)
    missing, unexpected = glm4.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("post_self_attn" in n or "post_mlp" in n for n in missing), (missing, unexpected)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in glm4.named_parameters():
            if name in missing:
                p.copy_(scales[name] * (1 + 0.05 * torch.randn_like(p)))
    glm4.save_pretrained(dst)
    glmtorch.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def llama_perplexity(binary: str, gguf: str, text: str, ctx: int) -> float:
    out = subprocess.run([binary, "-m", gguf, "-f", text, "-c", str(ctx), "-t", "2"], capture_output=True, text=True)
    found = re.findall(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if not found:
        raise RuntimeError(f"llama-perplexity gave no estimate:\n{out.stderr[-2000:]}")
    return float(found[-1])


def llama_greedy(binary: str, gguf: str, prompt: str, tokens: int) -> str:
    out = subprocess.run([binary, "-m", gguf, "-n", str(tokens), prompt], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"llama-simple failed:\n{out.stderr[-2000:]}")
    return out.stdout.split(prompt, 1)[-1]


def ours_greedy(path: str, prompt: str, tokens: int) -> str:
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=[])
    return tokenizer.decode(out[0, ids.shape[1]:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("text")
    parser.add_argument("--llama-cpp", required=True, help="the folder with llama-perplexity and llama-simple")
    parser.add_argument("--glm4-demo", action="store_true")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="glmtorch-llamacpp-")
    path = glm4_demo(args.checkpoint, os.path.join(work, "glm4"), args.text) if args.glm4_demo else args.checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    ours_ppl, chunks = perplexity(path, args.text, args.ctx)
    ours_text = ours_greedy(path, PROMPT, args.tokens)
    print(f"model: {type(model).__name__} ({path}); text: {args.text}, {chunks} chunks of {args.ctx} tokens\n")
    print("| weights | llama.cpp perplexity | glmtorch perplexity | greedy continuation identical |")
    print("| --- | --- | --- | --- |")
    print(f"| checkpoint (fp32) | - | {ours_ppl:.4f} | - |")
    for kind in ("f32", "q8_0"):
        gguf = os.path.join(work, f"model-{kind}.gguf")
        write_gguf(model, tokenizer, gguf, kind, progress=False)
        theirs = llama_perplexity(os.path.join(args.llama_cpp, "llama-perplexity"), gguf, args.text, args.ctx)
        from_gguf, _ = perplexity(gguf, args.text, args.ctx)
        their_text = llama_greedy(os.path.join(args.llama_cpp, "llama-simple"), gguf, PROMPT, args.tokens)
        mine = ours_text if kind == "f32" else ours_greedy(gguf, PROMPT, args.tokens)
        same = their_text.rstrip("\n") == mine.rstrip("\n")  # llama-simple ends its output with a newline
        print(f"| {kind} GGUF | {theirs:.4f} | {from_gguf:.4f} (loading the .gguf) | {'yes' if same else 'NO'} |")
        if not same:
            print(f"  llama.cpp: {their_text!r}\n  glmtorch:  {ours_text!r}")
    print(f"\ngreedy continuation of {PROMPT!r} ({args.tokens} tokens): {ours_text!r}")


if __name__ == "__main__":
    main()
