"""`glmtorch bench-serve URL`: load any OpenAI-compatible server with concurrent streaming requests and report
throughput, time to first token and inter-token latency (glmtorch, vLLM and llama-server alike)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from typing import Any

from ..cpuinfo import cpu_description


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"mean": statistics.fmean(values), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "max": values[-1]}


def _run_client(workload):
    """Run a workload's coroutine on uvloop where it is installed (it comes with the server's dependencies): the
    client shares the machine with the server it measures: a demo 64-burst took 0.04-0.07 client CPU-seconds on
    uvloop against 0.055-0.09 on asyncio's loop (AMD EPYC, same server, alternated)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(workload)
    return uvloop.run(workload)


class HttpError(Exception):
    """The server answered with a status other than 200."""


async def _sse_data(url: str, body: dict, headers: dict, timeout: float = 600.0):
    """POST `body` as JSON to an http:// URL and yield, per socket read, the `data:` payloads of the Server-Sent
    Events it completed (a list, often of one).

    Plain asyncio streams and HTTP/1.1, not an HTTP client library: with 64 streams on the 2-core machine that
    also runs the server, httpx's per-chunk machinery cost ~100 us of client CPU per token (0.41 CPU-seconds for
    a 64 x 64-token burst of the demo model, which took 1.2 s), and that CPU came out of the server's share: the
    measurement was slowing what it measured. Here the body is read a socket read at a time, its chunked framing
    and lines parsed in place, and what a read brought goes up in one piece; a stalled server is caught by one
    timer per request that looks at when the last read came (a timeout per read was a timer armed and cancelled
    per token)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"{url}: bench-serve speaks plain http:// (put a TLS proxy's plain side in front of it)")
    host, port = parts.hostname, parts.port or 80
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": parts.netloc, "Content-Type": "application/json",
                                                  "Accept": "text/event-stream", "Connection": "close",
                                                  "Content-Length": len(payload), **headers}.items())
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    loop = asyncio.get_running_loop()
    last_read, stalled = loop.time(), False

    def watch():  # every `timeout` seconds: nothing read for that long ends the request
        nonlocal stalled
        if loop.time() - last_read >= timeout:
            stalled = True
            writer.transport.abort()
        else:
            watchdog[0] = loop.call_at(last_read + timeout, watch)

    watchdog = [loop.call_later(timeout, watch)]
    try:
        writer.write(f"POST {parts.path or '/'} HTTP/1.1\r\n{head}\r\n".encode() + payload)
        await writer.drain()
        status = (await reader.readline()).decode("latin-1").split(" ", 2)
        fields = {}
        while (line := (await reader.readline()).decode("latin-1").strip()):
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        if stalled:
            raise TimeoutError(f"{url}: no answer for {timeout:g}s")  # the watchdog closed the connection
        if len(status) < 2 or status[1] != "200":
            text = await reader.read(4096)
            raise HttpError(f"HTTP {status[1] if len(status) > 1 else '?'}: {text[:200]!r}")
        # the body as it comes, a read at a time: every whole chunk of the chunked framing in it taken at once,
        # every whole line of those chunks' bytes looked at (no await per chunk or line: each was a task)
        raw = lines_pending = b""
        ended = False
        while not ended:
            data = await reader.read(65536)
            last_read = loop.time()
            if not data:
                break
            if chunked:
                raw += data
                data, at = b"", 0
                while (eol := raw.find(b"\r\n", at)) >= 0:
                    size = int(raw[at:eol].split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        ended = True
                        break
                    if len(raw) < eol + 2 + size + 2:
                        break  # the rest of this chunk is still on its way
                    data += raw[eol + 2:eol + 2 + size]
                    at = eol + 2 + size + 2
                raw = raw[at:]
            lines_pending += data
            *lines, lines_pending = lines_pending.split(b"\n")
            events = [line[5:].strip().decode() for line in lines if line.startswith(b"data:")]
            if events:
                yield events
        if stalled:  # the watchdog closed the connection: what was read ended there
            raise TimeoutError(f"{url}: the stream stalled for {timeout:g}s")
    finally:
        watchdog[0].cancel()
        writer.close()


async def _one(client, url: str, body: dict, headers: dict, started: asyncio.Event | None = None,
               stamps: list[float] | None = None) -> dict[str, Any]:
    """One streaming request; `started` is set when its first text arrives; `stamps`, when given, receives the
    arrival time of each piece of text as it comes (kept when the request is cancelled). `client` (httpx) serves
    https:// URLs; plain http:// goes through _sse_data."""
    start = time.perf_counter()
    first = None
    stamps = [] if stamps is None else stamps
    tokens = cached = prompt_tokens = 0
    text = ""
    try:
        async for events in _stream(client, url, body, headers):
            now = time.perf_counter()  # when this read's events came
            done = "[DONE]" in events
            for data in events[:events.index("[DONE]")] if done else events:
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", tokens)
                    prompt_tokens = chunk["usage"].get("prompt_tokens", prompt_tokens)
                    cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                for choice in chunk.get("choices", []):
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        first = first or now
                        if started is not None:
                            started.set()
                        stamps.append(now)
                        text += piece
            if done:
                break
    except Exception as e:  # noqa: BLE001 - counted, not raised
        return {"error": str(e) if isinstance(e, HttpError) else f"{type(e).__name__}: {e}"}
    finally:
        if started is not None:
            started.set()  # a request that fails or ends without text must not leave a waiter hanging
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": tokens or len(stamps), "gaps": gaps,
            "stamps": stamps, "text": text, "cached": cached, "prompt_tokens": prompt_tokens}


async def _stream(client, url: str, body: dict, headers: dict):
    """The `data:` payloads of a streamed response, in lists as they came: _sse_data for http://, httpx for
    https://."""
    if url.startswith("http://"):
        async for events in _sse_data(url, body, headers):
            yield events
        return
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            raise HttpError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                yield [line[5:].strip()]


WORDS = ("the quick brown fox jumps over a lazy dog while seven wise kings speak of old times " * 64).split()


def _base(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


async def _model_name(client, base: str, headers: dict, model: str | None) -> str:
    import httpx

    if model is not None:
        return model
    try:
        return (await client.get(f"{base}/models", headers=headers)).json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"cannot list the models of {base} ({type(e).__name__}: {e}); is the server up? "
                         "(or pass --model)") from None


def _request(base: str, model: str, i: int, prompt_words: int, max_tokens: int, chat: bool,
             temperature: float, shared_words: int = 0) -> tuple[str, dict]:
    """(url, body) of request number i: a distinct prompt of about `prompt_words` words, streamed, after a
    preamble of `shared_words` words that every request shares (a system prompt, a document asked about)."""
    words = WORDS * (2 + max(shared_words, prompt_words) // len(WORDS))  # as many words as asked for
    shared = " ".join(words[:shared_words])
    prompt = (shared + "\n" if shared else "") + f"Request {i}: " + " ".join(words[i % 7: i % 7 + prompt_words])
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        return f"{base}/chat/completions", body
    body["prompt"] = prompt
    return f"{base}/completions", body


async def _prefix_counters(client, base_url: str, headers: dict) -> dict[str, float] | None:
    """The server's prefix-cache counters from /metrics (vLLM's names), or None where it has none."""
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        text = (await client.get(f"{root}/metrics", headers=headers)).text
    except httpx.HTTPError:
        return None
    found = {}
    for line in text.splitlines():
        for key in ("queries", "hits"):
            if line.startswith(f"vllm:prefix_cache_{key}_total"):
                found[key] = found.get(key, 0.0) + float(line.split()[-1])
    return found if len(found) == 2 else None


def _hit_rate(before: dict | None, after: dict | None) -> float | None:
    if not before or not after or after["queries"] <= before["queries"]:
        return None
    return (after["hits"] - before["hits"]) / (after["queries"] - before["queries"])


@contextlib.asynccontextmanager
async def _session(base_url: str, api_key: str | None, model: str | None):
    """(client, the /v1 base, headers, the model's name) for one workload against a server."""
    import httpx

    base = _base(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        yield client, base, headers, await _model_name(client, base, headers, model)


async def _run(base_url: str, requests: int, concurrency: int, prompt_words: int, max_tokens: int,
               model: str | None, api_key: str | None, chat: bool, temperature: float,
               shared_words: int = 0) -> dict[str, Any]:
    async with _session(base_url, api_key, model) as (client, base, headers, model):
        semaphore = asyncio.Semaphore(concurrency)
        before = await _prefix_counters(client, base_url, headers)

        async def task(i: int):
            url, body = _request(base, model, i, prompt_words, max_tokens, chat, temperature, shared_words)
            async with semaphore:
                return await _one(client, url, body, headers)

        start, cpu = time.perf_counter(), time.process_time()
        # behind a shared preamble, the first request goes alone: its time to first token is the uncached one
        first = [await task(0)] if shared_words else []
        results = first + list(await asyncio.gather(*(task(i) for i in range(len(first), requests))))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = await _prefix_counters(client, base_url, headers)
    report = {**_summary(base_url, model, requests, concurrency, results, wall, before, after),
              "client_cpu_s": cpu}  # what the measuring took from the machine (it may be the server's too)
    if shared_words and "error" not in results[0]:
        rest = [r["ttft"] for r in results[1:] if "error" not in r]
        report.update(first_ttft_s=results[0]["ttft"], later_ttft_p50_s=_percentiles(rest).get("p50"))
    return {**report, "prompt_words": prompt_words, "shared_prefix_words": shared_words, "max_tokens": max_tokens}


def _summary(base_url: str, model: str, requests: int, concurrency: int, results: list[dict], wall: float,
             before: dict | None, after: dict | None) -> dict[str, Any]:
    """What every workload reports: completions and errors, throughput, latency percentiles, prefix-cache hits."""
    ok = [r for r in results if "error" not in r]
    out_tokens = sum(r["tokens"] for r in ok)
    return {
        "url": base_url, "model": model, "client_cpu": cpu_description(), "requests": requests,
        "concurrency": concurrency, "completed": len(ok), "cached_prompt_tokens": sum(r["cached"] for r in ok),
        "prefix_cache_hit_rate": _hit_rate(before, after),
        "errors": [r["error"] for r in results if "error" in r][:10], "error_count": requests - len(ok),
        "wall_s": wall, "output_tokens": out_tokens, "output_tok_s": out_tokens / wall,
        "ttft_s": _percentiles([r["ttft"] for r in ok]),
        "itl_s": _percentiles([g for r in ok for g in r["gaps"]]),
        "latency_s": _percentiles([r["latency"] for r in ok]),
    }


async def _run_multi_turn(base_url: str, users: int, concurrency: int, turns: int, prompt_words: int,
                          max_tokens: int, model: str | None, api_key: str | None, temperature: float) -> dict[str, Any]:
    """`users` chats of `turns` turns each: every turn resends the whole conversation (as chat clients do) plus a
    new question of about `prompt_words` words; up to `concurrency` chats at once."""
    async with _session(base_url, api_key, model) as (client, base, headers, model):
        semaphore = asyncio.Semaphore(concurrency)
        before = await _prefix_counters(client, base_url, headers)

        async def chat(user: int) -> list[dict]:
            messages, out = [], []
            async with semaphore:
                for turn in range(turns):
                    question = f"User {user}, question {turn}: " + " ".join(WORDS[(user + turn) % 11:][:prompt_words])
                    messages.append({"role": "user", "content": question})
                    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
                    result = await _one(client, f"{base}/chat/completions", body, headers)
                    out.append({**result, "turn": turn})
                    if "error" in result:
                        break
                    messages.append({"role": "assistant", "content": result["text"]})
            return out

        start = time.perf_counter()
        results = [r for chat_results in await asyncio.gather(*(chat(u) for u in range(users))) for r in chat_results]
        wall = time.perf_counter() - start
        after = await _prefix_counters(client, base_url, headers)
    ok = [r for r in results if "error" not in r]
    return {**_summary(base_url, model, users * turns, concurrency, results, wall, before, after),
            "turns": turns, "prompt_words": prompt_words, "max_tokens": max_tokens,
            "first_turn_ttft_p50_s": _percentiles([r["ttft"] for r in ok if r["turn"] == 0]).get("p50"),
            "later_turn_ttft_p50_s": _percentiles([r["ttft"] for r in ok if r["turn"] > 0]).get("p50")}


def multi_turn(url: str, users: int = 8, concurrency: int = 8, turns: int = 4, prompt_words: int = 30,
               max_tokens: int = 64, model: str | None = None, api_key: str | None = None,
               temperature: float = 0.0) -> dict[str, Any]:
    return _run_client(_run_multi_turn(url, users, concurrency, turns, prompt_words, max_tokens, model, api_key,
                                       temperature))


async def _ttft_under_load(base_url: str, background: int, long_tokens: int, long_words: int, probes: int,
                           model: str | None, api_key: str | None, chat: bool, max_pause: float) -> dict[str, Any]:
    """Time to first token of a short request (8 words, 8 tokens) alone, then while `background` long requests
    (`long_words`-word prompts, `long_tokens` new tokens each) are decoding; medians of `probes` requests each.

    Each probe waits a random pause (0-`max_pause` s, seeded) before it is sent, so that probes arrive at random
    points of the server's decode loop, as independent clients do. Sent the moment the previous probe ended, they
    would all arrive just after a step began (a probe ends with a step) and wait that whole step: the worst case
    every time, which max_pause=0 measures."""
    pauses = random.Random(0)
    async with _session(base_url, api_key, model) as (client, base, headers, model):

        async def probe(i: int) -> float:
            await asyncio.sleep(pauses.uniform(0.0, max_pause))
            url, body = _request(base, model, 1000 + i, 8, 8, chat, 0.0)
            result = await _one(client, url, body, headers)
            if "error" in result:
                raise RuntimeError(f"probe request failed: {result['error']}")
            return result["ttft"]

        await probe(0)  # warm-up
        alone = [await probe(i) for i in range(probes)]
        started = [asyncio.Event() for _ in range(background)]
        long_ones = []
        for i in range(background):
            url, body = _request(base, model, i, long_words, long_tokens, chat, 0.0)
            long_ones.append(asyncio.create_task(_one(client, url, body, headers, started[i])))
        await asyncio.gather(*(e.wait() for e in started))  # every long request is decoding
        failed = [t.result()["error"] for t in long_ones if t.done() and "error" in t.result()]
        if failed:
            raise RuntimeError(f"a long request failed: {failed[0]}")
        loaded = [await probe(probes + i) for i in range(probes)]
        still_running = sum(not t.done() for t in long_ones)
        for t in long_ones:
            t.cancel()
        await asyncio.gather(*long_ones, return_exceptions=True)
    unloaded_s, loaded_s = statistics.median(alone), statistics.median(loaded)
    return {"url": base_url, "model": model, "client_cpu": cpu_description(), "background_requests": background,
            "probes": probes,
            "long_tokens": long_tokens, "max_pause_s": max_pause, "background_still_decoding": still_running,
            "ttft_unloaded_s": unloaded_s, "ttft_loaded_s": loaded_s,
            "ratio": loaded_s / unloaded_s, "unloaded_all_s": alone, "loaded_all_s": loaded}


def ttft_under_load(url: str, background: int = 16, long_tokens: int = 256, long_words: int = 100, probes: int = 9,
                    model: str | None = None, api_key: str | None = None, chat: bool = False,
                    max_pause: float = 0.5) -> dict[str, Any]:
    if not max_pause >= 0:
        raise ValueError(f"the probe pause must be 0 seconds or more, got {max_pause}")
    return _run_client(_ttft_under_load(url, background, long_tokens, long_words, probes, model, api_key, chat,
                                        max_pause))


async def _long_prompt_under_load(base_url: str, background: int, long_words: int, prompt_words: int,
                                  max_tokens: int, model: str | None, api_key: str | None, calm: float) -> dict:
    """`background` streams decode (short prompts, `max_tokens` each); after `calm` seconds of their usual gaps, one
    prompt of `long_words` words arrives (a document pasted into a chat). What its prefill costs the streams: their
    worst gap between tokens while it was being prefilled (sent until its first token), against their usual gap
    (median before it arrived). Chunked prefill bounds it by one chunk's time, not the whole prompt's."""
    async with _session(base_url, api_key, model) as (client, base, headers, model):
        started = [asyncio.Event() for _ in range(background)]
        streams, stamps = [], [[] for _ in range(background)]
        for i in range(background):
            url, body = _request(base, model, i, prompt_words, max_tokens, False, 0.0)
            streams.append(asyncio.create_task(_one(client, url, body, headers, started[i], stamps[i])))
        await asyncio.gather(*(e.wait() for e in started))
        await asyncio.sleep(calm)
        url, body = _request(base, model, 10_000, long_words, 8, False, 0.0)
        sent = time.perf_counter()
        long_one = await _one(client, url, body, headers)
        if "error" in long_one:
            raise RuntimeError(f"the long request failed: {long_one['error']}")
        answered = sent + long_one["ttft"]
        ended = [t for t in streams if t.done()]  # finished early (too few --max-tokens), or failed
        for t in streams:
            t.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    failed = [t.result()["error"] for t in ended if "error" in t.result()]
    if failed:
        raise RuntimeError(f"a stream failed: {failed[0]}")
    if ended:
        raise RuntimeError(f"{len(ended)} streams ended before the long prompt's first token: give them more "
                           "--max-tokens")
    before = [b - a for times in stamps for a, b in zip(times, times[1:]) if b < sent]
    during = [b - a for times in stamps for a, b in zip(times, times[1:]) if b > sent and a < answered]
    usual = statistics.median(before)
    worst = max(during) if during else 0.0
    return {"url": base_url, "model": model, "client_cpu": cpu_description(), "background_requests": background,
            "long_prompt_words": long_words, "long_prompt_tokens": long_one.get("prompt_tokens"),
            "long_ttft_s": long_one["ttft"], "usual_gap_s": usual, "worst_gap_during_prefill_s": worst,
            "worst_over_usual": worst / usual, "gaps_during_prefill": len(during)}


def long_prompt_under_load(url: str, background: int = 16, long_words: int = 4000, prompt_words: int = 20,
                           max_tokens: int = 1024, model: str | None = None, api_key: str | None = None,
                           calm: float = 3.0) -> dict[str, Any]:
    return _run_client(_long_prompt_under_load(url, background, long_words, prompt_words, max_tokens, model,
                                               api_key, calm))


async def _batching_gain(base_url: str, rounds: int, burst: int, alone: int, prompt_words: int, max_tokens: int,
                         model: str | None, api_key: str | None, chat: bool, temperature: float) -> dict[str, Any]:
    """What batching gives: `burst` requests sent at once against `alone` sent one at a time (the same prompts as
    bench-serve's, the first `alone` of the burst's), in turn for `rounds` rounds after a short warm-up of each, so
    that a slow stretch of a shared machine hits both sides of a round alike; each round's ratio of output tok/s and
    their median. (Issue 22's figure; one pair of separate runs gave 3.5x-5.5x on one server in one hour, AMD EPYC
    Zen 4.)"""
    async def run(requests: int, concurrency: int, tokens: int) -> dict[str, Any]:
        return await _run(base_url, requests, concurrency, prompt_words, tokens, model, api_key, chat, temperature)

    await run(burst, burst, min(4, max_tokens))  # warm-up: the server's first steps of each size are not timed
    await run(alone, 1, min(4, max_tokens))
    bursts, singles = [], []
    for _ in range(rounds):
        bursts.append(await run(burst, burst, max_tokens))
        singles.append(await run(alone, 1, max_tokens))
    ratios = [b["output_tok_s"] / a["output_tok_s"] for b, a in zip(bursts, singles) if a["output_tok_s"] > 0]
    return {"url": base_url, "model": bursts[0]["model"], "client_cpu": cpu_description(), "burst": burst,
            "alone": alone, "rounds": rounds, "prompt_words": prompt_words, "max_tokens": max_tokens,
            "burst_tok_s": [b["output_tok_s"] for b in bursts], "alone_tok_s": [a["output_tok_s"] for a in singles],
            "ratios": ratios, "batching_gain": statistics.median(ratios) if ratios else None,
            "errors": [e for r in bursts + singles for e in r["errors"]][:10],
            "error_count": sum(r["error_count"] for r in bursts + singles)}


def batching_gain(url: str, rounds: int = 3, burst: int = 64, alone: int = 4, prompt_words: int = 100,
                  max_tokens: int = 64, model: str | None = None, api_key: str | None = None, chat: bool = False,
                  temperature: float = 0.0) -> dict[str, Any]:
    """`burst` at once against `alone` one at a time (at most as many as the burst), `rounds` rounds in turn."""
    if rounds < 1 or burst < 1 or alone < 1:
        raise ValueError(f"batching_gain: rounds, burst and alone must be at least 1 (got {rounds}, {burst}, {alone})")
    return _run_client(_batching_gain(url, rounds, burst, min(alone, burst), prompt_words, max_tokens, model, api_key,
                                      chat, temperature))


def bench_serve(url: str, requests: int = 64, concurrency: int = 64, prompt_words: int = 100, max_tokens: int = 64,
                model: str | None = None, api_key: str | None = None, chat: bool = False,
                temperature: float = 0.0, shared_words: int = 0) -> dict[str, Any]:
    return _run_client(_run(url, requests, concurrency, prompt_words, max_tokens, model, api_key, chat, temperature,
                            shared_words))


def format_serve_report(r: dict[str, Any]) -> str:
    if "batching_gain" in r:
        gain = "no round completed" if r["batching_gain"] is None else f"{r['batching_gain']:.2f}x on the median"
        return (f"{r['url']} model={r['model']}: {r['burst']} requests at once against {r['alone']} one at a time, "
                f"{r['rounds']} rounds in turn, {r['error_count']} errors\n"
                f"  at once: {' / '.join(f'{x:.0f}' for x in r['burst_tok_s'])} tok/s; one at a time: "
                f"{' / '.join(f'{x:.0f}' for x in r['alone_tok_s'])} tok/s\n"
                f"  batching gain: {' / '.join(f'{x:.2f}x' for x in r['ratios'])}: {gain}\n"
                f"  measured from: {_cpu_line(r.get('client_cpu'))}")
    if "worst_gap_during_prefill_s" in r:
        return (f"{r['url']} model={r['model']}: a {r['long_prompt_tokens']}-token prompt arriving while "
                f"{r['background_requests']} streams decode\n"
                f"  its time to first token {r['long_ttft_s']:.2f}s; the streams' usual gap "
                f"{1000 * r['usual_gap_s']:.0f}ms, worst while it was prefilled "
                f"{1000 * r['worst_gap_during_prefill_s']:.0f}ms ({r['worst_over_usual']:.1f}x)\n"
                f"  measured from: {_cpu_line(r.get('client_cpu'))}")
    if "ttft_loaded_s" in r:
        return (f"{r['url']} model={r['model']}: time to first token of a short request\n"
                f"  alone: {1000 * r['ttft_unloaded_s']:.0f}ms, while {r['background_requests']} long requests "
                f"decode: {1000 * r['ttft_loaded_s']:.0f}ms ({r['ratio']:.2f}x; medians of {r['probes']})")
    def ms(d):
        return " ".join(f"{k}={1000 * v:.0f}ms" for k, v in d.items())

    return (f"{r['url']} model={r['model']}: {r['completed']}/{r['requests']} completed, {r['error_count']} errors, "
            f"concurrency {r['concurrency']}\n"
            f"  output {r['output_tokens']} tokens in {r['wall_s']:.1f}s = {r['output_tok_s']:.1f} tok/s"
            f" ({r.get('cached_prompt_tokens', 0)} prompt tokens from the server's prefix cache"
            f"{_rate(r.get('prefix_cache_hit_rate'))})\n"
            + (f"  behind the shared preamble: first request's time to first token {1000 * r['first_ttft_s']:.0f}ms, "
               f"later ones' p50 {1000 * (r['later_ttft_p50_s'] or 0):.0f}ms\n" if "first_ttft_s" in r else "")
            + (f"  multi-turn chats of {r['turns']} turns: first turns' time to first token p50 "
               f"{1000 * (r['first_turn_ttft_p50_s'] or 0):.0f}ms, later turns' {1000 * (r['later_turn_ttft_p50_s'] or 0):.0f}ms\n"
               if "turns" in r else "")
            + f"  time to first token: {ms(r['ttft_s'])}\n  inter-token latency: {ms(r['itl_s'])}\n"
            f"  measured from: {_cpu_line(r.get('client_cpu'))}"
            + (f", the client using {r['client_cpu_s']:.2f} CPU-seconds" if "client_cpu_s" in r else ""))


def _rate(rate: float | None) -> str:
    return "" if rate is None else f"; hit rate {100 * rate:.1f}% by its /metrics"


def _cpu_line(cpu: dict | None) -> str:
    if not cpu:
        return "an unrecorded CPU"
    return f"{cpu['model']} ({', '.join(cpu['flags']) or 'no listed matrix flags'}; {cpu['cores']} cores)"
