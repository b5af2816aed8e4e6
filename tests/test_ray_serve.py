"""dgrt serve scaled out on Ray Serve: a local Ray instance on loopback, two replicas of the trained model
behind Ray's proxy, driven with the official openai client."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

import dgrt
from dgrt.errors import DgrtError
from dgrt.task import Task

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'ray[serve]')")
from ray import serve  # noqa: E402

from dgrt.serve.ray_serve import app  # noqa: E402

QUESTIONS = Task().examples(12, seed=654)


@pytest.fixture(scope="module")
def ray_url(trained_export: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {"path": str(trained_export), "model_name": "reverse", "replicas": "2", "max_batch": "4"}
        serve.run(app(options | {"threads": "1"}), name="dgrt", route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_as_generate_does(ray_url: str, trained_export: Path) -> None:
    client = openai.OpenAI(base_url=ray_url, api_key="none", max_retries=0, timeout=120)

    def ask(i: int) -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(
            model="reverse", messages=[{"role": "user", "content": QUESTIONS[i].question}], seed=i
        )
        return raw.parse().choices[0].message.content or "", raw.headers["x-dgrt-server"]

    with ThreadPoolExecutor(12) as pool:
        answers, servers = zip(*pool.map(ask, range(len(QUESTIONS))), strict=True)
    with dgrt.load(trained_export) as gen:
        assert list(answers) == [gen.generate(q.question, seed=i).texts[0] for i, q in enumerate(QUESTIONS)]
    assert [a.strip() for a in answers] == [q.answer for q in QUESTIONS]
    assert len(set(servers)) == 2  # both replicas answered
    status = serve.status().applications["dgrt"].deployments["dgrt"]
    assert status.replica_states.get("RUNNING") == 2


def test_bad_arguments_are_refused_in_one_sentence() -> None:
    with pytest.raises(DgrtError, match="takes path=EXPORT"):
        app({"model": "x"})
    with pytest.raises(DgrtError, match="replicas=0: expected a positive integer"):
        app({"path": ".", "replicas": "0"})
