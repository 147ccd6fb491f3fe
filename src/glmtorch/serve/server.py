"""`glmtorch serve`: load a model, start the engine, serve the app with uvicorn until Ctrl-C / SIGTERM."""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import threading

from ..fastpath import FusedDecodeStep, pack_weights
from ..modeling import Attention
from .app import create_app
from .engine import MAX_NUM_SEQS, Engine, Request, SamplingParams, default_kv_cache_memory


def load_for_serving(model_path: str | None, dtype: str = "auto", device: str | None = None,
                     quantize: str | None = None, tp_size: int | None = None):
    from .. import DEMO_MODEL
    from ..auto import AutoModelForCausalLM
    from ..device import infer_device
    from ..auto import AutoTokenizer

    path = model_path or DEMO_MODEL
    if tp_size:  # each rank its shard, on its own GPU (LOCAL_RANK) unless told otherwise
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device=device, quantize=quantize,
                                                     tp_size=tp_size)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device=device or infer_device(),
                                                     quantize=quantize)
    tokenizer = AutoTokenizer.from_pretrained(path)
    name = "glmtorch-demo" if model_path is None else os.path.basename(os.path.normpath(model_path))
    return model, tokenizer, name


def build_engine(model, tokenizer, max_num_seqs: int = MAX_NUM_SEQS, max_queue: int = 256,
                 max_context: int | None = None, thread: bool = True, prefix_caching: bool = True,
                 speculative_tokens: int = 0, kv_cache_memory: int | None = None) -> Engine:
    stop_ids = tokenizer.stop_token_ids(getattr(model.generation_config, "eos_token_id", None))
    return Engine(model, tokenizer, max_num_seqs=max_num_seqs, max_queue=max_queue, max_context=max_context,
                  stop_ids={i for i in stop_ids if i < model.config.vocab_size}, thread=thread,
                  prefix_caching=prefix_caching, speculative_tokens=speculative_tokens,
                  kv_cache_memory=kv_cache_memory)


# How much lower the HTTP thread's scheduling priority is than the engine's (Linux nice, per thread). On a CPU the
# engine's decode step runs on every core, its threads meeting at ~60 region ends a step; when the OS gave a core to
# the HTTP thread mid-step, the other thread waited at the next region end. Lowered, the HTTP thread mostly writes
# while the step's threads wait or spin: the demo model's 64-stream burst, two servers alternated, in both orders,
# 4,669 -> 5,652 and 4,745 -> 5,402 tok/s (medians of 4; AMD EPYC, 2 cores); one at a time unchanged. CFS still
# gives it ~10% of a contended core, so it never starves.
HTTP_NICE = 10


def freeze_startup_objects() -> None:
    """Leave what loading and warming up made (~330,000 objects for the demo model: modules, the tokenizer's
    tables, FastAPI's routes) out of every later garbage collection. Each request's objects outlive a young
    collection or two while it runs and so count towards a full one, which then walked all of them while holding
    the GIL: 130-170 ms every ~530 requests, in which no stream got a token and no request was read (AMD EPYC, 2
    cores). The server owns its process, so nothing a caller made is frozen with them."""
    gc.collect()
    gc.freeze()


def lower_this_threads_priority(by: int = HTTP_NICE) -> None:
    """Raise the calling thread's nice value by `by` (Linux: a thread is a task of its own); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:  # a sandbox that forbids it: the server works, only slower under load
        pass


PACK_ROWS = 64  # the batch the weights' layout is chosen for: beyond, a 2-core CPU gains little per row


def warm_up(engine: Engine) -> None:
    """Run tiny requests so the compiled decode steps exist before the first client arrives: one alone (the
    one-row step), then two together (the step for any larger batch, whose row count is dynamic); and make the
    measured choices that time whole passes (how prefill passes attend, PagedKVCache.decide_prefill_attention;
    which batches the fused decode step runs, FusedDecodeStep.decide_batches) before any stream waits on them."""
    attention = next(m for m in engine.model.modules() if isinstance(m, Attention))
    engine.cache.decide_prefill_attention(attention.qkv_sizes[0] // attention.head_dim, engine.prefill_tokens,
                                          engine.context)
    if isinstance(engine.step_fn, FusedDecodeStep):
        engine.step_fn.decide_batches(engine.model, engine.max_num_seqs)
    for batch in (1, 2) if engine.max_num_seqs > 1 else (1,):
        done = [threading.Event() for _ in range(batch)]
        for d in done:
            engine.submit(Request([0, 1, 2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                                  lambda e, d=d: e.kind != "text" and d.set()))
        if engine.thread is None:
            engine.run(until_idle=True)
        for d in done:
            d.wait(timeout=900)


def check_address(host: str, port: int) -> None:
    """Fail at once, in one line, when the address cannot be listened on (taken, or not this machine's)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"--host {host}: cannot be resolved ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror.lower() if e.strerror else e}; choose "
                          "another --port (or --host)") from None


def serve(model_path: str | None = None, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
          device: str | None = None, quantize: str | None = None, max_num_seqs: int = MAX_NUM_SEQS,
          max_queue: int = 256, kv_cache_memory: int | None = None,
          api_key: str | None = None, max_context: int | None = None, max_body_bytes: int | None = None,
          prefix_caching: bool = True, speculative_tokens: int = 0) -> None:
    import uvicorn

    # under torchrun: tensor parallel, rank 0 serves HTTP and schedules, the other ranks follow its steps
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if rank == 0:
        check_address(host, port)  # before minutes of loading, not after
    model, tokenizer, name = load_for_serving(model_path, dtype, device, quantize, world if world > 1 else None)
    if kv_cache_memory is None and rank == 0:
        kv_cache_memory = default_kv_cache_memory(model)
    if world > 1:
        import torch.distributed as dist

        box = [kv_cache_memory]
        dist.broadcast_object_list(box, src=0)  # every rank's pool as many blocks as rank 0's
        kv_cache_memory = box[0]
    else:  # (a shard's layout is left plain: timing it would run collectives each rank decides on alone)
        pack_weights(model, rows=min(max_num_seqs, PACK_ROWS))  # the server only runs inference, in batches
    engine = build_engine(model, tokenizer, max_num_seqs, max_queue, max_context, thread=False,
                          prefix_caching=prefix_caching, speculative_tokens=speculative_tokens,
                          kv_cache_memory=kv_cache_memory)
    if rank == 0:
        blocks = engine.pool.usable
        print(f"glmtorch: KV cache of {blocks} blocks x {engine.block_size} tokens "
              f"({blocks * model.kv_block_bytes(engine.block_size) / 2**30:.2f} GiB, taken as used): "
              f"{blocks * engine.block_size} tokens in all, up to {max_num_seqs} requests at once, each up to "
              f"{engine.context} tokens (--kv-cache-memory, --max-num-seqs and --max-context change it)",
              file=sys.stderr, flush=True)
    if rank != 0:
        engine.follow()
        return
    if model_path is None:
        print("glmtorch: no MODEL given, serving the built-in demo model", file=sys.stderr)
    print("glmtorch: warming up (on this machine's first start, timing which ways run fastest here: a minute or "
          "more, once)...", file=sys.stderr, flush=True)
    warm_up(engine)
    app = create_app(engine, tokenizer, name, api_key, **({"max_body_bytes": max_body_bytes} if max_body_bytes else {}))
    freeze_startup_objects()

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)  # in a thread of its own: it installs no signal handlers there

    def announce():
        shown = "localhost" if host in ("0.0.0.0", "127.0.0.1") else host
        print(f"glmtorch: serving {name!r} at http://{shown}:{port}/v1 (chat page: http://{shown}:{port}/)",
              flush=True)

    def http():
        try:
            lower_this_threads_priority()
            server.run()
        finally:  # the HTTP side ended (shut down, or failed to start): the engine ends too
            engine.request_stop()

    signalled = []

    def leave(signum, frame):  # Ctrl-C / SIGTERM: in-flight requests end with an error at once, then both stop
        signalled.append(signum)
        engine.request_stop()
        server.should_exit = True

    app.router.on_startup.append(announce)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, leave)
    http_thread = threading.Thread(target=http, name="glmtorch-http", daemon=True)
    http_thread.start()
    engine.run()  # the model runs in the main thread (see glmtorch.serve.engine)
    server.should_exit = True
    http_thread.join(timeout=10)
    if not server.started and not signalled:  # uvicorn could not listen after all (taken since check_address): say so, exit non-zero
        raise OSError(f"cannot listen on {host}:{port}; choose another --port (or --host)")
