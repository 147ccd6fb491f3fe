"""Where a served burst's CPU goes: bench-serve's 64-request burst against a running glmtorch server on this
machine, with the CPU time each of the server's threads (engine, OpenMP workers, HTTP) and this client used in it.

    glmtorch serve --port 8041 &  python scripts/served_burst_cpu.py $! http://127.0.0.1:8041 [--bursts 3]

On a machine whose few cores the client shares with the server, a burst is CPU-bound: the threads' sum against
twice (cores) the wall time says how much of the cores the HTTP side and the client take from the engine.
Linux only (/proc/PID/task)."""

import argparse
import os
import resource
import time

from glmtorch.serve.bench import bench_serve


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of process `pid`, by tid ('main' for the process's first thread, where
    `glmtorch serve` runs its engine): the scheduler's nanoseconds where the kernel keeps them (schedstat),
    else user + system clock ticks (10 ms each)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        name = "main" if int(tid) == pid else tid
        try:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[name] = int(f.read().split()[0]) / 1e9
            except (FileNotFoundError, ValueError, IndexError):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:  # the thread ended meanwhile
            continue
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pid", type=int, help="the server's process id")
    p.add_argument("url")
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    bench_serve(args.url, requests=args.requests, concurrency=args.requests, max_tokens=4)  # warm-up
    for _ in range(args.bursts):
        before, mine, start = thread_seconds(args.pid), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        report = bench_serve(args.url, requests=args.requests, concurrency=args.requests, max_tokens=args.max_tokens)
        wall, after = time.perf_counter() - start, thread_seconds(args.pid)
        used = resource.getrusage(resource.RUSAGE_SELF)
        client = used.ru_utime - mine.ru_utime + used.ru_stime - mine.ru_stime
        threads = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
        shown = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in sorted(threads.items(), key=lambda kv: -kv[1]))
        print(f"{report['output_tok_s']:.0f} tok/s, {wall * 1e3:.0f} ms wall (with the client's setup); CPU ms: "
              f"server threads {shown}; client {client * 1e3:.0f}; all {(sum(threads.values()) + client) * 1e3:.0f}")


if __name__ == "__main__":
    main()
