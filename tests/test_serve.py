"""`dgrt serve`, driven as users drive it: the official openai client against a real uvicorn server on
loopback, serving the shipped trained model (string reversal) from its ONNX export."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import uvicorn

import dgrt
from dgrt.runtime.batching import Batcher, Job, Observer
from dgrt.runtime.generator import Generator
from dgrt.serve.app import create_app
from dgrt.task import Task

QUESTIONS = Task().examples(8, seed=321)
MODEL = "reverse"
KEY = "sk-test-key"


@dataclass
class Server:
    url: str
    gen: Generator

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def alone(self, question: str, seed: int, max_new_tokens: int = 48) -> str:
        """What generate answers alone (batch 1) with this seed: the reference for every served answer."""
        result = self.gen.generate(question, seed=seed, max_new_tokens=max_new_tokens)
        return result.texts[0]

    def metric(self, name: str) -> float:
        lines = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text.splitlines()
        return sum(
            float(line.split()[-1]) for line in lines if line.startswith(name + " ") or line.startswith(name + "{")
        )


@pytest.fixture(scope="module")
def server(trained_export: Path) -> Iterator[Server]:
    gen = dgrt.load(trained_export)
    app = create_app(gen, MODEL, max_batch=4, api_key=KEY, max_body_bytes=64 * 1024)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    yield Server(f"http://127.0.0.1:{port}", gen)
    uv.should_exit = True
    thread.join(timeout=30)
    gen.close()


def test_chat_and_completions_answer_as_generate_does(server: Server) -> None:
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    q = QUESTIONS[0]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q.question}], seed=7)
    answer = chat.choices[0].message.content
    assert answer is not None and answer.strip() == q.answer == server.alone(q.question, 7).strip()
    assert chat.choices[0].finish_reason == "stop" and chat.object == "chat.completion"
    assert chat.usage is not None and chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 10

    # Completions take the raw prompt (no chat template); max_tokens cuts the answer.
    text = client.completions.create(model=MODEL, prompt=q.question, max_tokens=5, seed=1)
    assert text.choices[0].finish_reason == "length" and text.usage is not None and text.usage.completion_tokens == 5
    # The diffusion sampler's settings ride along as extra fields.
    fixed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": q.question}], seed=7, extra_body={"steps": 8}
    )
    assert fixed.choices[0].message.content is not None


def test_streaming_sends_each_canvas_then_the_finish_and_usage(server: Server) -> None:
    client = server.client()
    q = QUESTIONS[1]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": q.question}],
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"drafts": True},
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2  # the answer spans canvases: one delta per committed canvas
    assert "".join(deltas).strip() == q.answer == server.alone(q.question, 3).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    drafts = [c.model_extra["dgrt"] for c in chunks if c.model_extra and "dgrt" in c.model_extra]
    assert drafts and {"draft", "canvas", "step"} <= drafts[0].keys()  # the refining canvas, step by step
    canvas = server.gen.info.canvas_length
    assert all(len(d["tokens"]) == len(d["accepted"]) == canvas for d in drafts)  # each position, kept or not
    assert all(isinstance(kept, bool) for d in drafts for kept in d["accepted"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_concurrent_requests_share_batches_and_get_their_own_answers(server: Server) -> None:
    """Batch invariance: each request answers what it answers alone, whoever shares its batches."""
    client = server.client()
    steps_before, rows_before = (
        server.metric("dgrt_denoise_step_rows_count"),
        server.metric("dgrt_denoise_step_rows_sum"),
    )

    def ask(i: int) -> str:
        q = QUESTIONS[i]
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q.question}], seed=i)
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [server.alone(q.question, i) for i, q in enumerate(QUESTIONS)]
    assert [a.strip() for a in answers] == [q.answer for q in QUESTIONS]
    steps = server.metric("dgrt_denoise_step_rows_count") - steps_before
    rows = server.metric("dgrt_denoise_step_rows_sum") - rows_before
    assert rows / steps > 1.5  # they did share steps (at most 4 rows a batch here)


def test_a_client_that_leaves_frees_its_row(server: Server) -> None:
    left = server.metric('dgrt_requests_total{endpoint="completions",status="499"}')
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL, "prompt": "x" * 40, "max_tokens": 400, "stream": True, "stability_threshold": None},
        timeout=60,
    ) as response:
        assert next(response.iter_lines()).startswith("data: ")  # the first canvas is under way
    deadline = time.time() + 60
    while server.metric("dgrt_batch_occupancy") > 0 and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric("dgrt_batch_occupancy") == 0  # 25 canvases of 48 steps were not run for nobody
    assert server.metric('dgrt_requests_total{endpoint="completions",status="499"}') == left + 1


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"temperature": 0.7}, 400, "Unsupported field 'temperature'"),
        ({"n": 2}, 400, "Invalid 'n'"),
        ({"model": "gpt-4"}, 404, "does not exist"),
        ({"steps": 0}, 400, "steps"),
        ({"max_tokens": 10**6}, 400, "'max_tokens' is 1000000"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
        ({"messages": []}, 400, "Invalid 'messages'"),
        ({"messages": [{"role": "user", "content": "x" * 70_000}]}, 413, "over 65536 bytes"),
    ],
)
def test_bad_requests_get_one_sentence_in_openai_error_json(
    server: Server, body: dict[str, object], status: int, words: str
) -> None:
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Reverse: abc"}]} | body
    r = httpx.post(f"{server.url}/v1/chat/completions", json=request, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status
    error = r.json()["error"]
    assert words in error["message"] and {"type", "param", "code"} <= error.keys()


def test_the_api_key_guards_the_api_but_not_health(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    names = ["dgrt_requests_total", "dgrt_queue_depth", "dgrt_batch_occupancy", "dgrt_prefill_seconds_bucket"]
    names += ["dgrt_denoise_step_seconds_bucket", "dgrt_steps_per_canvas_bucket", "dgrt_generated_tokens_total"]
    assert all(name in text for name in names)


def test_a_stop_string_across_canvases_is_never_streamed(server: Server) -> None:
    """The text a stream sends only grows: an ending that may start a stop string waits for the next canvas."""
    q = next(q for q in QUESTIONS if len(q.answer) >= 18)
    stop = q.answer[15:17]  # the canvas holds 16 tokens: this stop string starts in the first, ends in the second
    chunks = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": q.question}], seed=5, stop=stop, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == server.alone(q.question, 5).split(stop)[0]


def test_stop_strings_end_the_answer(server: Server) -> None:
    q = QUESTIONS[2]
    stop = q.answer[5:7]
    reply = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": q.question}], seed=0, stop=stop
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == server.alone(q.question, 0).split(stop)[0]
    # usage counts the tokens of what was returned, not those of the stop string and after
    assert reply.usage is not None and reply.usage.completion_tokens == len(reply.choices[0].message.content)


def test_the_batcher_alone_joins_rows_as_they_come(trained_export: Path) -> None:
    """No HTTP: jobs of different lengths and sampler settings (fewer steps, another temperature schedule,
    no adaptive stopping) submitted over time join running batches at canvas boundaries and still get
    generate's tokens."""
    settings: list[dict[str, Any]] = [{} for _ in QUESTIONS]
    settings[3], settings[5] = {"steps": 8}, {"t_max": 0.5, "stability_threshold": None}
    with dgrt.load(trained_export) as gen:
        batcher = Batcher(gen, max_batch=3)
        jobs = []
        for i, q in enumerate(QUESTIONS):
            limit = 16 * (1 + i % 3)
            job = Job.create(gen, q.question, seed=i, max_new_tokens=limit, listener=lambda u: None, **settings[i])
            jobs.append(batcher.submit(job))
            time.sleep(0.02 * (i % 3))
        assert all(job.wait(60) for job in jobs)
        batcher.close()
        for i, (q, job) in enumerate(zip(QUESTIONS, jobs, strict=True)):
            limit = 16 * (1 + i % 3)
            alone = gen.generate(q.question, seed=i, max_new_tokens=limit, **settings[i]).tokens[0]
            eos = next((k for k, t in enumerate(alone) if t in gen.eos_token_id), len(alone))
            assert job.tokens == alone[: min(eos, limit)]
            assert job.finish_reason == ("stop" if eos < limit else "length")


def test_the_timeline_sheds_a_long_prompt_that_left(trained_export: Path) -> None:
    """Rows share one timeline; once a long prompt's row has left, the padding the others kept for it is
    dropped, so the timeline does not grow for as long as the server has work."""
    seen: list[tuple[int, int]] = []  # after each canvas's prefill: rows, the timeline's length

    class Watch(Observer):
        def prefill(self, seconds: float, rows: int) -> None:
            seen.append((rows, batcher.cache.length))

    long_prompt, question = "Reverse: " + "abcdefghij" * 5, QUESTIONS[0].question
    with dgrt.load(trained_export) as gen:
        batcher = Batcher(gen, max_batch=2, observer=Watch())
        with gen._exclusive():  # the loop waits for the model: both jobs are waiting when it admits
            long = batcher.submit(Job.create(gen, long_prompt, seed=1, max_new_tokens=16, listener=lambda u: None))
            short = batcher.submit(Job.create(gen, question, seed=2, max_new_tokens=64, listener=lambda u: None))
        assert long.wait(60) and short.wait(60)
        batcher.close()
        alone = gen.generate(question, seed=2, max_new_tokens=64).tokens[0]
    eos = next((k for k, t in enumerate(alone) if t in gen.eos_token_id), len(alone))
    assert short.tokens == alone[:eos]
    c = gen.info.canvas_length
    assert seen[0] == (2, long.prompt_tokens)  # both prompts prefilled together: the long one's timeline
    assert seen[-1] == (1, short.prompt_tokens + (short.canvases - 1) * c)  # the short row's own history only


def chromium(tmp_path: Path) -> Any:
    """Debian's headless Chromium under Selenium (the packages chromium and chromium-driver; CI installs them
    and sets DGRT_REQUIRE_BROWSER=1, so that there a missing browser fails instead of skipping)."""
    import os
    import shutil

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        if os.environ.get("DGRT_REQUIRE_BROWSER"):
            pytest.fail("DGRT_REQUIRE_BROWSER is set but chromium or chromedriver is not installed")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_the_playground_shows_the_canvas_refining_and_the_answer(server: Server, tmp_path: Path) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    q = QUESTIONS[2]
    browser = chromium(tmp_path)
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "prompt").send_keys(q.question)
        browser.find_element(By.ID, "seed").send_keys("5")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") != "running"
        )
        body = browser.find_element(By.TAG_NAME, "body")
        assert body.get_attribute("data-state") == "done", browser.find_element(By.ID, "error").text
        answer = browser.find_element(By.ID, "answer").text
        assert answer.strip() == q.answer == server.alone(q.question, 5).strip()
        assert int(body.get_attribute("data-drafts") or 0) >= 2  # drawn step by step, not once
        assert "tokens/s" in browser.find_element(By.ID, "stats").text
        cells = browser.find_elements(By.CSS_SELECTOR, "#canvas span")
        assert len(cells) == server.gen.info.canvas_length
        shot = tmp_path / "playground.png"
        browser.find_element(By.ID, "canvas").screenshot(str(shot))
    finally:
        browser.quit()
    # The picture, not only the DOM: the canvas is drawn, mostly in the sampler's "kept" green (#1f7a4d).
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int64).reshape(-1, 3)
    green = int((np.abs(pixels - [0x1F, 0x7A, 0x4D]) < 12).all(axis=1).sum())
    assert green > 0.3 * len(pixels), f"{green} of {len(pixels)} pixels are the kept colour"
