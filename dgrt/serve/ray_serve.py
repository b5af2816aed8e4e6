"""`dgrt serve` scaled out on Ray Serve: the same app (dgrt.serve.app) in each replica, a GPU per replica
with `gpus_per_replica=1` (the default 0 runs replicas on CPUs), replicas added and removed on the
requests in flight.

    serve run dgrt.serve.ray_serve:app path=EXPORT [model_name=NAME] [replicas=2 | min_replicas=1
        max_replicas=4 [upscale_delay_s=30] [downscale_delay_s=600]] [max_batch=8] [max_context=N]
        [api_key=KEY] [gpus_per_replica=1] [backend=...] [threads=N]

Ray's HTTP proxy answers on port 8000 (`serve run --port` to change it) with the OpenAI API of
dgrt.serve.app; each replica batches the requests it is given (dgrt.runtime.batching). Autoscaling aims
at `max_batch` requests in flight per replica: a replica with a full batch and a queue is what another
replica relieves. The delays are Ray's: how long the load must stay above (below) the target before a
replica is added (removed); Ray's defaults are 30 s and 600 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve

from dgrt.errors import DgrtError
from dgrt.serve.app import create_app


@serve.ingress()
class DgrtReplica:
    """One replica: a loaded model and its batcher, behind the OpenAI API."""

    def __init__(self, path: str, model_name: str, options: dict[str, Any]):
        import dgrt

        self.model_name, self.options = model_name, options
        self.gen = dgrt.load(path, backend=options.get("backend"), threads=options.get("threads"))

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(
            self.gen,
            self.model_name,
            max_batch=self.options["max_batch"],
            max_context=self.options.get("max_context"),
            api_key=self.options.get("api_key"),
            owns_generator=True,
        )


def app(args: dict[str, str]) -> serve.Application:
    """The application `serve run dgrt.serve.ray_serve:app path=...` builds (arguments as in the module
    docstring, all strings)."""
    known = {"path", "model_name", "replicas", "min_replicas", "max_replicas", "upscale_delay_s",
             "downscale_delay_s", "max_batch", "max_context", "api_key", "gpus_per_replica", "backend",
             "threads"}  # fmt: skip
    unknown = sorted(set(args) - known)
    if unknown or "path" not in args:
        raise DgrtError(f"dgrt on Ray Serve takes path=EXPORT and optionally {', '.join(sorted(known - {'path'}))}; "
                        f"got {', '.join(unknown) or 'no path'}.")  # fmt: skip
    path = Path(args["path"]).resolve()
    max_batch = _positive(args, "max_batch", 8)
    try:
        gpus = float(args.get("gpus_per_replica", "0"))
    except ValueError:
        gpus = -1.0
    if not gpus >= 0:
        raise DgrtError(f"gpus_per_replica={args['gpus_per_replica']}: expected a number of GPUs, 0 or more.")
    options: dict[str, Any] = {"max_batch": max_batch, "api_key": args.get("api_key"), "backend": args.get("backend")}
    for name in ("threads", "max_context"):
        if name in args:
            options[name] = _positive(args, name, 1)
    scaling: dict[str, Any]
    if "replicas" in args:
        scaling = {"num_replicas": _positive(args, "replicas", 1)}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": _positive(args, "min_replicas", 1),
                "max_replicas": _positive(args, "max_replicas", 4),
                "target_ongoing_requests": max_batch,
            }
            | {name: _positive(args, name, 1) for name in ("upscale_delay_s", "downscale_delay_s") if name in args}
        }
    deployment = serve.deployment(
        name="dgrt",
        max_ongoing_requests=4 * max_batch,  # the rest wait in Ray's queue, where autoscaling sees them
        ray_actor_options={"num_gpus": gpus, "num_cpus": options.get("threads", 1)},
        **scaling,
    )(DgrtReplica)
    return deployment.bind(str(path), args.get("model_name", path.name), options)


def _positive(args: dict[str, str], name: str, default: int) -> int:
    value = args.get(name, str(default))
    if not value.isdigit() or int(value) < 1:
        raise DgrtError(f"{name}={value}: expected a positive integer.")
    return int(value)
