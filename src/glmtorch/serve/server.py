"""`glmtorch serve`: load a model, start the engine, serve the app with uvicorn until Ctrl-C / SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

from ..fastpath import pack_weights
from .app import create_app
from .engine import Engine, Request, SamplingParams


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


def build_engine(model, tokenizer, max_batch: int, max_queue: int, max_context: int | None = None,
                 thread: bool = True, prefix_caching: bool = True, speculative_tokens: int = 0) -> Engine:
    stop_ids = tokenizer.stop_token_ids(getattr(model.generation_config, "eos_token_id", None))
    return Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                  stop_ids={i for i in stop_ids if i < model.config.vocab_size}, thread=thread,
                  prefix_caching=prefix_caching, speculative_tokens=speculative_tokens)


MAX_AUTO_BATCH = 64  # the most slots chosen by default: beyond, a 2-core CPU gains little throughput per row
KV_SHARE = 0.25  # of the memory free after loading, what the KV cache may take by default


def choose_max_batch(model, context: int, kv_cache_memory: int | None = None) -> int:
    """How many slots of `context` tokens the KV cache gets by default: as many as fit `kv_cache_memory` bytes
    (default: a quarter of the memory free after loading the model), at most MAX_AUTO_BATCH, at least one. The
    demo model gets 64; GLM-4-9B in bf16 with its full 128K context (5.4 GB a slot) gets one on most machines,
    which says to lower --max-context."""
    from ..device import available_memory

    budget = kv_cache_memory
    if budget is None:
        free = available_memory(model.device)
        budget = int(free * KV_SHARE) if free is not None else 4 << 30
    return max(1, min(MAX_AUTO_BATCH, budget // max(1, model.static_cache_bytes(1, context))))


def warm_up(engine: Engine) -> None:
    """Run tiny requests so the compiled decode steps exist before the first client arrives: one alone (the
    one-row step), then two together (the step for any larger batch, whose row count is dynamic)."""
    for batch in (1, 2) if engine.max_batch > 1 else (1,):
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
          device: str | None = None, quantize: str | None = None, max_batch: int | None = None,
          max_queue: int = 256, kv_cache_memory: int | None = None,
          api_key: str | None = None, max_context: int | None = None, max_body_bytes: int | None = None,
          prefix_caching: bool = True, speculative_tokens: int = 0) -> None:
    import uvicorn

    # under torchrun: tensor parallel, rank 0 serves HTTP and schedules, the other ranks follow its steps
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if rank == 0:
        check_address(host, port)  # before minutes of loading, not after
    model, tokenizer, name = load_for_serving(model_path, dtype, device, quantize, world if world > 1 else None)
    if max_batch is None and rank == 0:
        context = min(max_context or model.config.max_position_embeddings, model.config.max_position_embeddings)
        max_batch = choose_max_batch(model, context, kv_cache_memory)
        print(f"glmtorch: KV cache of {max_batch} slots x {context} tokens "
              f"({max_batch * model.static_cache_bytes(1, context) / 2**30:.2f} GiB; --max-batch, --max-context and "
              "--kv-cache-memory change it)", file=sys.stderr, flush=True)
    if world > 1:
        import torch.distributed as dist

        box = [max_batch]
        dist.broadcast_object_list(box, src=0)  # every rank's cache the same size as rank 0's
        max_batch = box[0]
    else:  # (a shard's layout is left plain: timing it would run collectives each rank decides on alone)
        pack_weights(model, rows=max_batch)  # the server only runs inference, in batches of up to max_batch rows
    engine = build_engine(model, tokenizer, max_batch, max_queue, max_context, thread=False,
                          prefix_caching=prefix_caching, speculative_tokens=speculative_tokens)
    if rank != 0:
        engine.follow()
        return
    if model_path is None:
        print("glmtorch: no MODEL given, serving the built-in demo model", file=sys.stderr)
    print("glmtorch: warming up...", file=sys.stderr, flush=True)
    warm_up(engine)
    app = create_app(engine, tokenizer, name, api_key, **({"max_body_bytes": max_body_bytes} if max_body_bytes else {}))

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)  # in a thread of its own: it installs no signal handlers there

    def announce():
        shown = "localhost" if host in ("0.0.0.0", "127.0.0.1") else host
        print(f"glmtorch: serving {name!r} at http://{shown}:{port}/v1 (chat page: http://{shown}:{port}/)",
              flush=True)

    def http():
        try:
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
