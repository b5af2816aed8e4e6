"""Ray Serve autoscaling under load: does dgrt's deployment add a replica when a full batch has a queue, and
drop it when the load is gone?

    python tools/ray_autoscale.py EXPORT [--clients 32] [--load-s 90] [--idle-s 60] [--max-batch 4]
        [--upscale-delay-s 10] [--downscale-delay-s 20] [--json FILE]

A local Ray instance on loopback (2 CPUs) runs `dgrt.serve.ray_serve:app` with min_replicas=1,
max_replicas=2 and one thread per replica. `--clients` threads send chat completions with the official
openai client for `--load-s` seconds, then nothing for `--idle-s`. Every second the running replicas are
read from `serve.status()`; the report gives the timeline, when the second replica started and stopped,
and the requests, errors and tokens/s of the load phase.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import openai
import ray
from load_test import free_port
from ray import serve

from dgrt.serve.ray_serve import app
from dgrt.task import Task


def running_replicas() -> int:
    status = serve.status().applications.get("dgrt")
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--load-s", type=float, default=90)
    ap.add_argument("--idle-s", type=float, default=60)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--upscale-delay-s", type=int, default=10)
    ap.add_argument("--downscale-delay-s", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    task = Task.from_dir(args.export)
    questions = [q.question for q in task.examples(512, seed=7)] if task else ["Tell me a story."] * 512
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    timeline: list[tuple[float, int]] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {
            "path": str(args.export),
            "model_name": "dgrt",
            "min_replicas": "1",
            "max_replicas": "2",
            "max_batch": str(args.max_batch),
            "threads": "1",
            "upscale_delay_s": str(args.upscale_delay_s),
            "downscale_delay_s": str(args.downscale_delay_s),
        }
        serve.run(app(options), name="dgrt", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        t0 = time.perf_counter()
        stop_load, stop_watch = threading.Event(), threading.Event()

        def watch() -> None:
            while not stop_watch.is_set():
                timeline.append((round(time.perf_counter() - t0, 1), running_replicas()))
                time.sleep(1.0)

        def client_loop(worker: int) -> tuple[int, int, int]:
            requests = errors = tokens = 0
            while not stop_load.is_set():
                question = questions[(worker * 97 + requests) % len(questions)]
                try:
                    reply = client.chat.completions.create(
                        model="dgrt", messages=[{"role": "user", "content": question}], seed=requests
                    )
                    tokens += reply.usage.completion_tokens if reply.usage else 0
                except openai.OpenAIError:
                    errors += 1
                requests += 1
            return requests, errors, tokens

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(client_loop, i) for i in range(args.clients)]
            time.sleep(args.load_s)
            stop_load.set()
            counts = [f.result() for f in futures]
        load_wall = time.perf_counter() - t0
        time.sleep(args.idle_s)
        stop_watch.set()
        watcher.join()
    finally:
        serve.shutdown()
        ray.shutdown()

    up = next((t for t, n in timeline if n >= 2), None)
    down = next((t for t, n in timeline if up is not None and t > up and n <= 1), None)
    report = {
        "date": str(date.today()),
        "machine": platform.machine(),
        "clients": args.clients,
        "max_batch": args.max_batch,
        "upscale_delay_s": args.upscale_delay_s,
        "downscale_delay_s": args.downscale_delay_s,
        "load_s": round(load_wall, 1),
        "requests": sum(c[0] for c in counts),
        "errors": sum(c[1] for c in counts),
        "tokens_per_s": sum(c[2] for c in counts) / load_wall,
        "second_replica_running_at_s": up,
        "back_to_one_replica_at_s": down,
        "timeline": timeline,
    }
    print(
        f"{report['requests']} requests from {args.clients} clients in {report['load_s']} s, {report['errors']} "
        f"errors, {report['tokens_per_s']:.1f} tokens/s; a second replica ran from {up} s "
        f"(load ended at {report['load_s']} s) and was gone at {down} s"
    )
    changes = [timeline[0]] + [b for a, b in zip(timeline, timeline[1:], strict=False) if a[1] != b[1]]
    print("replicas running: " + ", ".join(f"{n} at {t} s" for t, n in changes))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
