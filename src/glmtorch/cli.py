"""The `glmtorch` command. A table of subcommands, each importing what it needs only when it runs, so
`glmtorch --help` is instant. Every subcommand is thin: it parses flags and calls the library."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


# -- flag values: one range per kind of value, checked as argparse reads it ----------------------------------------
def byte_size(text: str) -> int:
    """An argparse type: bytes from "4GiB", "500MB", "2000000" (checkpoint.parse_size), at least 1 MiB."""
    from .checkpoint.safetensors_io import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GiB or 500MB") from None
    if value < 2**20:
        raise argparse.ArgumentTypeError(f"{text} is too small: at least 1MiB")
    return value


byte_size.__name__ = "size"


def ranged(kind: type, low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` in [low, high], else a usage error naming the range."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be in [{low}, {high}]")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def sampling_value(name: str) -> Callable[[str], float]:
    """An argparse type checked against generate()'s declared range for `name` (generation.config)."""
    def parse(text: str):
        from .generation.config import SAMPLING_BOUNDS, SamplingValueError, check_sampling_value

        try:
            value = SAMPLING_BOUNDS[name].kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        try:
            return check_sampling_value(name, value)
        except SamplingValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name
    return parse


def clean_text(text: str) -> str:
    """Text from argv or stdin as valid UTF-8: undecodable bytes (a Latin-1 'é' in a UTF-8 terminal) become U+FFFD
    instead of failing deep inside the tokenizer."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# -- shared flags ---------------------------------------------------------------------------------------------
def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or hub id (default: the small demo model shipped with glmtorch)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: the best available)")


# Most proposals a pass: prompt lookup's cost nothing to make, and 15 + the pending token fill one row bucket of
# the kernels (16 rows, where int4 verifies on AMX tiles at ~1.2x a 9-row pass); generation.speculate picks fewer
# each round where passes cost more than they return. A draft model's each cost a draft step: fewer.
NGRAM_TOKENS, DRAFT_TOKENS = 15, 8


def add_speculation_flags(p: argparse.ArgumentParser, drafts: bool = True) -> None:
    if drafts:
        p.add_argument("--speculate", default=None, metavar="ngram|int4|DRAFT",
                       help="speculative decoding, output unchanged: ngram proposes tokens copied from the prompt and "
                            "output (prompt lookup); int4 an int4 copy of the model; DRAFT a smaller checkpoint with "
                            "the same tokenizer")
    else:
        p.add_argument("--speculate", default=None, choices=["ngram"],
                       help="speculative decoding at batch 1: ngram proposes tokens copied from the prompt and output "
                            "(prompt lookup); output unchanged, faster where it repeats its input")
    p.add_argument("--num-speculative-tokens", type=sampling_value("prompt_lookup_num_tokens"), default=None,
                   metavar="K", help=f"most tokens proposed per pass (with --speculate; default {NGRAM_TOKENS} for "
                                     f"ngram, whose proposals cost nothing to make, {DRAFT_TOKENS} for a draft model)")


def speculative_tokens(args: argparse.Namespace) -> int:
    if args.num_speculative_tokens is not None:
        return args.num_speculative_tokens
    return NGRAM_TOKENS if args.speculate == "ngram" else DRAFT_TOKENS


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=sampling_value("max_new_tokens"), default=256)
    p.add_argument("--temperature", type=sampling_value("temperature"), default=None, help="0 means greedy")
    p.add_argument("--top-k", type=sampling_value("top_k"), default=None)
    p.add_argument("--top-p", type=sampling_value("top_p"), default=None)
    p.add_argument("--min-p", type=sampling_value("min_p"), default=None)
    p.add_argument("--repetition-penalty", type=sampling_value("repetition_penalty"), default=None)
    p.add_argument("--seed", type=sampling_value("seed"), default=None)
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    p.add_argument("--system", default=None, help="a system prompt")
    add_speculation_flags(p)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repetition_penalty=args.repetition_penalty, seed=args.seed,
              prompt_lookup_num_tokens=speculative_tokens(args) if args.speculate == "ngram" else None)
    if getattr(args, "draft", None) is not None:  # --speculate int4 | DRAFT, loaded by load()
        kw.update(assistant_model=args.draft, num_assistant_tokens=speculative_tokens(args))
    if args.greedy or args.temperature == 0:
        kw["do_sample"] = False
    elif args.temperature is not None or args.top_k is not None or args.top_p is not None or args.min_p is not None:
        kw.update(do_sample=True, temperature=args.temperature)
    return {k: v for k, v in kw.items() if v is not None}


def load(args: argparse.Namespace):
    """(model, tokenizer), with the demo model when no MODEL is given."""
    from . import DEMO_MODEL
    from .auto import AutoModelForCausalLM, AutoTokenizer
    from .device import infer_device
    from .fastpath import pack_weights

    path = args.model
    if path is None:
        if not is_main_process():
            path = DEMO_MODEL
        elif not os.path.isfile(os.path.join(DEMO_MODEL, "config.json")):
            raise UsageError("no MODEL given and this installation has no demo model; pass a checkpoint directory")
        print(f"glmtorch: no MODEL given, using the built-in demo model ({DEMO_MODEL})", file=sys.stderr)
        path = DEMO_MODEL
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: tensor parallel across the job's processes
        device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if infer_device() == "cuda" else "cpu")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, device=device, tp_size=world)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, device=args.device or infer_device())
        pack_weights(model)  # inference only from here on
    tokenizer = AutoTokenizer.from_pretrained(path)
    speculate = getattr(args, "speculate", None)
    args.draft = None
    if speculate not in (None, "ngram"):  # a draft model: an int4 copy of this one, or another checkpoint
        draft = path if speculate == "int4" else speculate
        args.draft = AutoModelForCausalLM.from_pretrained(draft, dtype=args.dtype, device=model.device,
                                                          quantize="int4" if speculate == "int4" else None)
        if args.draft.config.vocab_size != model.config.vocab_size:
            raise UsageError(f"--speculate {speculate}: its vocabulary has {args.draft.config.vocab_size} tokens, "
                             f"the model's {model.config.vocab_size}; a draft must share the model's tokenizer")
    from .fastpath import compile_enabled

    if compile_enabled(model) and is_main_process():  # else the first reply's wait looks like a hang
        print("glmtorch: the first reply compiles the decode step (tens of seconds, once per process and batch "
              "shape; GLMTORCH_COMPILE=0 skips it)", file=sys.stderr)
    return model, tokenizer


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def read_line_everywhere() -> str:
    """A line of stdin read by rank 0 and shared with every rank of a tensor-parallel job ("" at the end)."""
    line = clean_text(sys.stdin.readline()) if is_main_process() else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def stop_ids(model, tokenizer) -> list[int]:
    ids = tokenizer.stop_token_ids(model.generation_config.eos_token_id)
    return sorted(i for i in ids if i < model.config.vocab_size)


DIM, PLAIN = "\x1b[2m", "\x1b[0m"


def stream_reply(model, tokenizer, input_ids, kwargs, out=None, thinking: str = "show") -> str:
    """Print the reply as it is generated and return its text. A reasoning model's thinking (GLM-Z1) is printed
    dimmed on a terminal (between <think> tags elsewhere), or not at all with thinking="hide"."""
    from .chat import ReasoningStream, prompt_opens_thinking
    from .generation.streaming import stream_text

    if out is None:
        out = sys.stdout if is_main_process() else open(os.devnull, "w")  # only rank 0 prints
    styled = hasattr(out, "isatty") and out.isatty()
    split = ReasoningStream(prompt_opens_thinking(tokenizer.decode(input_ids[0, -8:].tolist())))
    text, answered, in_thought = "", False, False

    def show(thought: str, answer: str) -> None:
        nonlocal answered, in_thought
        if thought and thinking == "show":
            if not in_thought:
                out.write(DIM if styled else "<think>\n")
                in_thought = True
            out.write(thought)
        if answer and not answered:
            answer = answer.lstrip("\n")  # GLM-4 opens every reply with a newline after <|assistant|>
            answered = bool(answer)
        if answer and in_thought:
            out.write(PLAIN + "\n\n" if styled else "\n</think>\n\n")
            in_thought = False
        out.write(answer)
        out.flush()

    for piece, _ in stream_text(model, tokenizer, input_ids, eos_token_id=stop_ids(model, tokenizer), **kwargs):
        text += piece
        show(*split.feed(piece))
    show(*split.finish())
    if in_thought:  # cut inside the thinking
        out.write(PLAIN if styled else "\n</think>")
    out.write("\n")
    out.flush()
    return text


# -- subcommands ----------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    args.prompt, args.system = clean_text(args.prompt), args.system and clean_text(args.system)
    schema = read_json_schema(args.json_schema)  # before minutes of loading, not after
    model, tokenizer = load(args)
    if schema is not None:
        from .generation.constrain import ConstraintError, as_constraint_spec, compile_constraint

        try:  # checked before generating: an unsupported schema is a one-line error, not a traceback mid-reply
            compile_constraint(tokenizer, as_constraint_spec(schema), model.config.vocab_size,
                               stop_ids(model, tokenizer))
        except ConstraintError as e:
            raise UsageError(f"--json-schema {args.json_schema}: {e}") from None
    if args.raw:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            **template_kwargs(args))
    kwargs = sampling_kwargs(args)
    if schema is not None:
        kwargs["response_format"] = schema
    stream_reply(model, tokenizer, ids.to(model.device), kwargs, thinking=args.thinking)
    return 0


def read_json_schema(path: str | None):
    """The JSON schema in a file, or a one-line UsageError saying what is wrong with it."""
    if path is None:
        return None
    import json

    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise UsageError(f"--json-schema {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--json-schema {path}: not a JSON file ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise UsageError(f"--json-schema {path}: a JSON schema is an object, got {type(schema).__name__}")
    return schema


def template_kwargs(args: argparse.Namespace) -> dict:
    """--thinking off asks the chat template not to think (enable_thinking=false, where the template has it)."""
    return {"enable_thinking": False} if args.thinking == "off" else {}


def cmd_chat(args: argparse.Namespace) -> int:
    args.system = args.system and clean_text(args.system)
    if is_main_process() and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # undecodable bytes reach clean_text, not a traceback
    model, tokenizer = load(args)
    interactive = sys.stdin.isatty() and is_main_process()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    if interactive:
        print("Chatting with the model. /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = read_line_everywhere()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            if is_main_process():
                print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = _fit_context(model, tokenizer, system, history, args.max_new_tokens, template_kwargs(args))
        reply = stream_reply(model, tokenizer, ids.to(model.device), sampling_kwargs(args), thinking=args.thinking)
        history.append({"role": "assistant", "content": reply})
    return 0


def _fit_context(model, tokenizer, system, history, max_new_tokens, extra=None):
    """Render the conversation, dropping the oldest turns while it leaves no room for the reply."""
    limit = model.config.max_position_embeddings
    while True:
        ids = tokenizer.apply_chat_template(system + history, add_generation_prompt=True, return_tensors="pt",
                                            **(extra or {}))
        if ids.shape[1] + min(max_new_tokens, limit // 4) <= limit or len(history) <= 1:
            if ids.shape[1] >= limit:
                raise UsageError(f"the message is {ids.shape[1]} tokens; the model's context is {limit}")
            return ids
        del history[:2]


def cmd_train(args: argparse.Namespace) -> int:
    import json
    from dataclasses import fields

    from .auto import AutoModelForCausalLM, AutoTokenizer
    from .config import GlmConfig
    from .device import infer_device
    from .tokenizer import train_bpe_tokenizer
    from .train import TrainConfig, load_checkpoint_state, read_rows, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    cfg.validate()
    device = args.device or infer_device()
    state = optimizer_state = None
    if args.resume:
        model = AutoModelForCausalLM.from_pretrained(args.resume, dtype="float32", device=device)
        tokenizer = AutoTokenizer.from_pretrained(args.resume)
        state, optimizer_state = load_checkpoint_state(args.resume)
    elif args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32", device=device)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    else:
        if not args.config:
            raise UsageError("give --model CHECKPOINT to fine-tune, --resume DIR, or --config CONFIG.json for a new model")
        if args.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        elif args.vocab_size:
            texts = [r.get("text") or "\n".join(str(m.get("content", "")) for m in r["messages"])
                     for _, r in read_rows(args.data)]
            tokenizer = train_bpe_tokenizer(texts, args.vocab_size)
        else:
            raise UsageError("a new model needs a tokenizer: --tokenizer DIR, or --vocab-size N to train one on the data")
        with open(args.config, encoding="utf-8") as f:
            overrides = json.load(f)
        config = GlmConfig.from_dict({"vocab_size": tokenizer.vocab_size, "pad_token_id": tokenizer.pad_token_id,
                                      "eos_token_id": sorted(tokenizer.stop_token_ids()), **overrides})
        import torch

        torch.manual_seed(args.seed)  # the fresh model's initial weights
        model = AutoModelForCausalLM.from_config(config, device=device)
    print(f"glmtorch: training {model.num_parameters():,} parameters on {device}", file=sys.stderr)
    state = train(model, tokenizer, cfg, state, optimizer_state)
    final = [h for h in state.history if "val_loss" in h][-1]
    print(f"glmtorch: {state.step} steps in {state.seconds / 60:.1f} min; validation loss {final['val_loss']:.4f} "
          f"({final['val_nats_per_char']:.4f} nats/char); saved to {cfg.out}")
    return 0


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help=".txt, or .jsonl of {\"text\"} / {\"messages\"} rows")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--val-data", default=None, help="validation file (default: the last --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--model", default=None, help="checkpoint to fine-tune")
    p.add_argument("--resume", default=None, help="training checkpoint to continue")
    p.add_argument("--config", default=None, help="config.json fields for a new model")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--vocab-size", type=int, default=None, help="train a new BPE tokenizer of this size on the data")
    p.add_argument("--device", default=None)
    for name, kind, default in [("block-size", int, 256), ("batch-size", int, 16), ("grad-accum", int, 1),
                                ("lr", float, 1e-3), ("min-lr-ratio", float, 0.1), ("warmup-steps", int, 100),
                                ("max-steps", int, 1000), ("stop-at", int, None), ("weight-decay", float, 0.1), ("grad-clip", float, 1.0),
                                ("eval-every", int, 200), ("eval-windows", int, 64), ("save-every", int, 0),
                                ("seed", int, 0)]:
        p.add_argument(f"--{name}", type=kind, default=default)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")


def cmd_convert(args: argparse.Namespace) -> int:
    if args.dst.endswith(".gguf"):
        from .auto import AutoModelForCausalLM, AutoTokenizer
        from .checkpoint.gguf import write_gguf
        from .extras import require

        require("gguf", "writing a GGUF file")

        if os.path.exists(args.dst):
            raise UsageError(f"{args.dst}: already exists; choose a new destination or remove it first")
        model = AutoModelForCausalLM.from_pretrained(args.src, dtype="float32")
        write_gguf(model, AutoTokenizer.from_pretrained(args.src), args.dst, args.type)
        print(f"glmtorch: wrote {args.dst} (llama.cpp chatglm, {args.type})")
        return 0
    from .checkpoint.convert import convert_checkpoint

    written = convert_checkpoint(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"glmtorch: wrote {args.dst} ({', '.join(written)})")
    return 0


def bench_schema(path: str | None):
    """--json-schema for bench: a file's schema, or with no file the built-in one (bench.BENCH_SCHEMA)."""
    if path == "":
        from .bench import BENCH_SCHEMA

        return BENCH_SCHEMA
    return read_json_schema(path)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run_bench

    report = run_bench(args.model, preset=args.preset, dtype=args.dtype, quantize=args.quantize, device=args.device,
                       prefill=args.prefill, new_tokens=args.new_tokens, batches=tuple(args.batch), reps=args.reps,
                       with_transformers=not args.no_transformers, llama_cpp=args.llama_cpp, out=args.out,
                       arch=args.arch, json_schema=bench_schema(args.json_schema),
                       speculate=speculative_tokens(args) if args.speculate else None)
    print(format_report(report))
    return 0


def _bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint (default: random weights of --preset)")
    p.add_argument("--preset", default="small", choices=["tiny", "small", "glm4-9b"])
    p.add_argument("--json-schema", nargs="?", const="", default=None, metavar="FILE",
                   help="also time decoding constrained to the JSON schema in FILE (default: a list of strings)")
    add_speculation_flags(p, drafts=False)
    p.add_argument("--arch", default="glm", choices=["glm", "glm4"],
                   help="the preset's layer: glm (GLM-4-9B) or glm4 (GLM-4-0414 / GLM-Z1, with sandwich norms)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"])
    p.add_argument("--device", default=None)
    p.add_argument("--prefill", type=ranged(int, 1, 2**20), default=512)
    p.add_argument("--new-tokens", type=ranged(int, 1, 2**20), default=64, help="decode length (llama.cpp decodes as many)")
    p.add_argument("--batch", type=ranged(int, 1, 4096), nargs="+", default=[1, 8])
    p.add_argument("--reps", type=ranged(int, 1, 1000), default=5)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--llama-cpp", default=None, help="a llama.cpp build directory (with llama-bench)")
    p.add_argument("--out", default=None, help="write the report here as JSON (and a PNG chart beside it)")


def _convert_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint to convert (transformers or THUDM original format)")
    p.add_argument("dst", help="new directory to write (must not exist), or a .gguf file for llama.cpp")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 (bf16) or float16 (default: keep)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="tensor type when DST ends in .gguf")


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.server import serve

    serve(args.model, host=args.host, port=args.port, dtype=args.dtype, device=args.device, quantize=args.quantize,
          max_num_seqs=args.max_num_seqs, max_queue=args.max_queue, kv_cache_memory=args.kv_cache_memory,
          api_key=args.api_key, max_context=args.max_context,
          max_body_bytes=args.max_request_body_size, prefix_caching=not args.no_prefix_caching,
          speculative_tokens=args.num_speculative_tokens if args.speculative else 0)
    return 0


def _serve_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=ranged(int, 1, 65535), default=8000)
    p.add_argument("--quantize", default=None, choices=["int8", "int4"])
    p.add_argument("--max-num-seqs", "--max-batch", type=ranged(int, 1, 4096), default=256,
                   help="most requests decoded together, if the KV cache holds them (default 256)")
    p.add_argument("--kv-cache-memory", type=byte_size, default=None, metavar="SIZE",
                   help="memory for the KV cache's blocks, e.g. 4GiB (default: a quarter of what is free after "
                        "loading on a CPU, taken as used; 80%% on a GPU)")
    p.add_argument("--max-queue", type=ranged(int, 0, 1_000_000), default=256, help="requests allowed to wait; beyond: HTTP 503")
    p.add_argument("--max-context", type=ranged(int, 2, 2**24), default=None,
                   help="most tokens per request, prompt and output (default: the model's)")
    p.add_argument("--speculative", default=None, choices=["ngram"],
                   help="greedy requests check tokens proposed by prompt lookup while few requests decode")
    p.add_argument("--num-speculative-tokens", type=sampling_value("prompt_lookup_num_tokens"), default=8,
                   metavar="K", help="most tokens a request proposes per step (with --speculative)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="prefill every prompt whole (by default a prompt starts from the longest prefix the KV cache "
                        "holds)")
    p.add_argument("--api-key", default=os.environ.get("GLMTORCH_API_KEY"), help="require this bearer key")
    p.add_argument("--max-request-body-size", type=ranged(int, 1024, 2**31), default=32 * 2**20, metavar="BYTES",
                   help="larger request bodies get HTTP 413 (default 32 MiB)")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import json

    from .serve.bench import (batching_gain, bench_serve, format_serve_report, long_prompt_under_load, multi_turn,
                              ttft_under_load)

    if args.batching_gain:
        report = batching_gain(args.url, args.batching_gain, args.requests, prompt_words=args.prompt_words,
                               max_tokens=args.max_tokens, model=args.model, api_key=args.api_key, chat=args.chat,
                               temperature=args.temperature)
    elif args.multi_turn:
        report = multi_turn(args.url, args.requests, args.concurrency, args.multi_turn, args.prompt_words,
                            args.max_tokens, args.model, args.api_key, args.temperature)
    elif args.long_prompt_under_load:
        report = long_prompt_under_load(args.url, args.long_prompt_under_load, args.long_prompt_words,
                                        args.prompt_words, args.max_tokens, args.model, args.api_key)
    elif args.ttft_under_load:
        report = ttft_under_load(args.url, args.ttft_under_load, args.max_tokens, args.prompt_words, model=args.model,
                                 api_key=args.api_key, chat=args.chat, max_pause=args.probe_pause)
    else:
        report = bench_serve(args.url, args.requests, args.concurrency, args.prompt_words, args.max_tokens,
                             args.model, args.api_key, args.chat, args.temperature, args.shared_prefix_words)
    print(format_serve_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report.get("error_count", 0) == 0 else 1


def _bench_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=ranged(int, 1, 1_000_000), default=64)
    p.add_argument("--concurrency", type=ranged(int, 1, 100_000), default=64)
    p.add_argument("--prompt-words", type=ranged(int, 1, 1_000_000), default=100)
    p.add_argument("--shared-prefix-words", type=ranged(int, 0, 1_000_000), default=0, metavar="N",
                   help="put the same N-word preamble before every prompt (a shared system prompt or document); the "
                        "first request goes alone, so its time to first token is the uncached one")
    p.add_argument("--multi-turn", type=ranged(int, 0, 10_000), default=0, metavar="TURNS",
                   help="instead: --requests chats of TURNS turns each, every turn resending the conversation so far")
    p.add_argument("--max-tokens", type=ranged(int, 1, 2**20), default=64)
    p.add_argument("--temperature", type=sampling_value("temperature"), default=0.0)
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions instead of /v1/completions")
    p.add_argument("--ttft-under-load", type=ranged(int, 0, 100_000), default=0, metavar="N",
                   help="instead: time to first token of a short request alone and while N long requests "
                        "(--prompt-words and --max-tokens each) decode")
    p.add_argument("--probe-pause", type=ranged(float, 0.0, 3600.0), default=0.5, metavar="SECONDS",
                   help="with --ttft-under-load: each probe waits a random pause of up to this long, so probes "
                        "arrive at random points of the server's decode loop (0: right after the previous one "
                        "ended, which lands just after a decode step began: the worst case)")
    p.add_argument("--long-prompt-under-load", type=ranged(int, 0, 100_000), default=0, metavar="N",
                   help="instead: N streams decode (--prompt-words, --max-tokens each) and one prompt of "
                        "--long-prompt-words words arrives; reports the streams' worst gap while it is prefilled")
    p.add_argument("--long-prompt-words", type=ranged(int, 1, 10_000_000), default=4000, metavar="W")
    p.add_argument("--batching-gain", type=ranged(int, 0, 1000), default=0, metavar="ROUNDS",
                   help="instead: --requests requests at once against 4 one at a time, in turn for ROUNDS rounds "
                        "(after a short warm-up); reports each round's ratio of output tok/s and their median")
    p.add_argument("--out", default=None, help="also write the report as JSON")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}
# Optional packages a subcommand cannot start without, checked before it loads anything (extras.EXTRAS says which
# pip extra brings each).
RUNS_A_MODEL = ("generate", "chat", "serve", "bench", "train")  # the allocator is tuned for them (reuse_freed_memory)
NEEDS: dict[str, tuple[str, ...]] = {"serve": ("fastapi", "uvicorn", "prometheus_client"), "bench-serve": ("httpx",)}


def _generate_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt (a user message, unless --raw)")
    p.add_argument("--raw", action="store_true", help="complete the prompt text as is, without the chat template")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="constrain the reply to JSON valid against the schema in FILE")
    add_sampling_flags(p)
    add_thinking_flag(p)


def _chat_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_sampling_flags(p)
    add_thinking_flag(p)


def add_thinking_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--thinking", default="show", choices=["show", "hide", "off"],
                   help="a reasoning model's (GLM-Z1) thinking: show it dimmed (default), hide it, or ask the chat "
                        "template to skip it (enable_thinking=false, where the template supports that)")


COMMANDS["generate"] = ("generate a reply to one prompt", _generate_flags, cmd_generate)
COMMANDS["chat"] = ("chat interactively (or with lines piped on stdin)", _chat_flags, cmd_chat)
COMMANDS["convert"] = ("convert a checkpoint to the transformers format", _convert_flags, cmd_convert)
COMMANDS["bench"] = ("benchmark glmtorch against transformers (and llama.cpp)", _bench_flags, cmd_bench)
COMMANDS["serve"] = ("serve a model over an OpenAI-compatible HTTP API", _serve_flags, cmd_serve)
COMMANDS["bench-serve"] = ("load-test an OpenAI-compatible server", _bench_serve_flags, cmd_bench_serve)
COMMANDS["train"] = ("train or fine-tune a GLM model on text or chat data", _train_flags, cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmtorch", description="Run GLM-4 family models in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_flags, _) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if "torch.distributed" in sys.modules:
        _leave_distributed_job(code)
    return code


def _leave_distributed_job(code: int) -> None:
    """Under torchrun: wait for every rank (bounded), then exit without running C++ destructors. A gloo group
    torn down at interpreter exit while a peer still talks to it aborted a rank now and then ("terminate called
    without an active exception", test_generate_command_under_torchrun on a loaded machine)."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    except Exception:  # a peer that already failed: leave anyway
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _show_own_warnings_in_one_line() -> None:
    """In the command, glmtorch's own warnings print as its errors do, one line on stderr (`glmtorch: warning:
    ...`), not as Python shows them (the file and line that warned, then that line of code); others as before."""
    if getattr(warnings.showwarning, "glmtorch", False):
        return
    package, shown = os.path.dirname(os.path.abspath(__file__)) + os.sep, warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not os.path.abspath(filename).startswith(package):
            return shown(message, category, filename, lineno, file, line)
        text = str(message).removeprefix("glmtorch: ")
        try:
            print(f"glmtorch: warning: {text}", file=file or sys.stderr, flush=True)
        except OSError:  # stderr closed: nothing to tell
            pass

    show.glmtorch = True
    warnings.showwarning = show


def _main(argv: list[str] | None = None) -> int:
    from .extras import MissingDependency, install_hint, missing_message, require

    args = build_parser().parse_args(argv)
    _show_own_warnings_in_one_line()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, a job scheduler, a container stopping) unwinds like Ctrl-C, so what cleans up half-written
        # files on an exception (convert, GGUF export, training checkpoints) runs on it too
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        for module in NEEDS.get(args.command, ()):
            require(module, f"glmtorch {args.command}")
        if args.command in RUNS_A_MODEL:
            from .device import reuse_freed_memory

            reuse_freed_memory()
        return COMMANDS[args.command][2](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an optional package reached without require(): still one line, if we know it
        if e.name is None or install_hint(e.name) is None:
            raise
        message = missing_message(e.name)
    except (UsageError, ValueError, OSError, MemoryError, MissingDependency) as e:  # ConfigError, CheckpointError..
        message = " ".join(line.strip() for line in str(e).splitlines()) or type(e).__name__
    print(f"glmtorch: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
