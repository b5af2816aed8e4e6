"""A bounded load test of `dgrt serve` on loopback: one client at a time, then C concurrent clients.

    python tools/load_test.py EXPORT [--clients 16 64] [--requests 64] [--max-batch 16] [--threads N] [--json FILE]

Starts `dgrt serve EXPORT` in its own process on a free port, sends `--requests` chat completions of the
task's questions (or of a fixed text prompt for a model without a task) with the official openai client,
first one at a time and then from each number of concurrent clients, and reports per run: errors,
completion tokens per second over the run's wall time, and request latency p50 / p99 (median of the
run's requests). Client threads run on the same machine as the server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from statistics import quantiles

import httpx
import openai

from dgrt.task import Task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(client: openai.OpenAI, model: str, prompts: list[str], clients: int) -> dict[str, object]:
    def one(i: int) -> tuple[float, int, str | None]:
        t0 = time.perf_counter()
        try:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompts[i]}], seed=i
            )
        except openai.OpenAIError as e:
            return time.perf_counter() - t0, 0, str(e)
        tokens = reply.usage.completion_tokens if reply.usage else 0
        return time.perf_counter() - t0, tokens, None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    cuts = quantiles(latencies, n=100, method="inclusive")
    return {
        "clients": clients,
        "requests": len(prompts),
        "errors": sum(r[2] is not None for r in results),
        "first_error": next((r[2] for r in results if r[2]), None),
        "wall_s": wall,
        "completion_tokens": sum(r[1] for r in results),
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "latency_p50_s": cuts[49],
        "latency_p99_s": cuts[98],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path)
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, help="the server's CPU threads (default: dgrt serve's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    task = Task.from_dir(args.export)
    prompts = (
        [q.question for q in task.examples(args.requests, seed=99)] if task else ["Tell me a story."] * args.requests
    )
    port, model = free_port(), "load-test"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dgrt",
            "serve",
            str(args.export),
            "--port",
            str(port),
            "--served-model-name",
            model,
            "--max-batch",
            str(args.max_batch),
            *(["--threads", str(args.threads)] if args.threads else []),
        ],  # fmt: skip
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health").json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        run(client, model, prompts[:4], 1)  # warm-up
        rows = [run(client, model, prompts, 1)] + [run(client, model, prompts, c) for c in args.clients]
    finally:
        server.terminate()
        server.wait(timeout=60)
    base = rows[0]["tokens_per_s"]
    assert isinstance(base, float)
    for row in rows:
        assert isinstance(row["tokens_per_s"], float)
        row["speedup_vs_one_client"] = row["tokens_per_s"] / base
        print(
            f"{row['clients']:>3} clients: {row['requests']} requests, {row['errors']} errors, "
            f"{row['tokens_per_s']:.1f} tokens/s ({row['speedup_vs_one_client']:.2f}x), "
            f"latency p50 {row['latency_p50_s']:.3f} s p99 {row['latency_p99_s']:.3f} s"
        )
    report = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "max_batch": args.max_batch, "threads": args.threads, "runs": rows}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
