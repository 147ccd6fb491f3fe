"""The `glmtorch` command. A table of subcommands, each importing what it needs only when it runs, so
`glmtorch --help` is instant. Every subcommand is thin: it parses flags and calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


# -- shared flags ---------------------------------------------------------------------------------------------
def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or hub id (default: the small demo model shipped with glmtorch)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: the best available)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    p.add_argument("--system", default=None, help="a system prompt")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.greedy or args.temperature == 0:
        kw["do_sample"] = False
    elif args.temperature is not None or args.top_k is not None or args.top_p is not None or args.min_p is not None:
        kw.update(do_sample=True, temperature=args.temperature)
    return {k: v for k, v in kw.items() if v is not None}


def load(args: argparse.Namespace):
    """(model, tokenizer), with the demo model when no MODEL is given."""
    from . import DEMO_MODEL
    from .auto import AutoModelForCausalLM
    from .device import infer_device
    from .tokenizer import AutoTokenizer

    path = args.model
    if path is None:
        if not os.path.isfile(os.path.join(DEMO_MODEL, "config.json")):
            raise UsageError("no MODEL given and this installation has no demo model; pass a checkpoint directory")
        print(f"glmtorch: no MODEL given, using the built-in demo model ({DEMO_MODEL})", file=sys.stderr)
        path = DEMO_MODEL
    device = args.device or infer_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def stop_ids(model, tokenizer) -> list[int]:
    ids = tokenizer.stop_token_ids(model.generation_config.eos_token_id)
    return sorted(i for i in ids if i < model.config.vocab_size)


def stream_reply(model, tokenizer, input_ids, kwargs, out=sys.stdout) -> str:
    from .generation.streaming import stream_text

    text = ""
    for piece, _ in stream_text(model, tokenizer, input_ids, eos_token_id=stop_ids(model, tokenizer), **kwargs):
        if not text:
            piece = piece.lstrip("\n")  # GLM-4 opens every reply with a newline after <|assistant|>
        text += piece
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return text


# -- subcommands ----------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    if args.raw:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    stream_reply(model, tokenizer, ids.to(model.device), sampling_kwargs(args))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    if interactive:
        print("Chatting with the model. /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = _fit_context(model, tokenizer, system, history, args.max_new_tokens)
        reply = stream_reply(model, tokenizer, ids.to(model.device), sampling_kwargs(args))
        history.append({"role": "assistant", "content": reply})
    return 0


def _fit_context(model, tokenizer, system, history, max_new_tokens):
    """Render the conversation, dropping the oldest turns while it leaves no room for the reply."""
    limit = model.config.max_position_embeddings
    while True:
        ids = tokenizer.apply_chat_template(system + history, add_generation_prompt=True, return_tensors="pt")
        if ids.shape[1] + min(max_new_tokens, limit // 4) <= limit or len(history) <= 1:
            if ids.shape[1] >= limit:
                raise UsageError(f"the message is {ids.shape[1]} tokens; the model's context is {limit}")
            return ids
        del history[:2]


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def _generate_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt (a user message, unless --raw)")
    p.add_argument("--raw", action="store_true", help="complete the prompt text as is, without the chat template")
    add_sampling_flags(p)


def _chat_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_sampling_flags(p)


COMMANDS["generate"] = ("generate a reply to one prompt", _generate_flags, cmd_generate)
COMMANDS["chat"] = ("chat interactively (or with lines piped on stdin)", _chat_flags, cmd_chat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmtorch", description="Run GLM-4 family models in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_flags, _) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as e:  # our clear errors (ConfigError, CheckpointError, ...) included
        message = " ".join(line.strip() for line in str(e).splitlines()) or type(e).__name__
        print(f"glmtorch: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
