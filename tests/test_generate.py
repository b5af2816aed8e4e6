"""dgrt's block-diffusion loop against transformers' DiffusionGemma generate, token for token.

Both sides consume the same random numbers: transformers draws its canvases and renoise tokens from the
global torch generator, which `torch.manual_seed(seed)` puts in the same state as dgrt's seeded
generator; its torch.multinomial is replaced by the inverse-CDF draw dgrt's denoise graph makes from one
uniform number per position, taken from that same stream in the same order.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dgrt
from dgrt.cli import main
from dgrt.errors import DgrtError
from dgrt.runtime.generator import Generator, Session
from dgrt.sampler import SamplerConfig, SamplerSettings
from dgrt.validate import inverse_cdf_multinomial

STEPS = 8
PROMPTS = torch.tensor([[2, 17, 33, 49, 65, 81, 97, 113, 129, 145, 161, 177], [2, 9, 8, 7, 6, 5, 4, 3, 22, 23, 24, 25]])
FAST = {"steps": 2, "max_new_tokens": 16}


def reference_generate(path: Path, ids: torch.Tensor, seed: int, **kwargs):
    """transformers' generate with dgrt's sampling draw; returns (new tokens, tokens_per_forward, output).
    Tests that call it skip without transformers; the others need only dgrt."""
    transformers = pytest.importorskip("transformers", reason="the reference extra (transformers==5.23.0) is needed")
    model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    with inverse_cdf_multinomial(), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, max_denoising_steps=STEPS, **kwargs)
    return out.sequences[:, ids.shape[1] :], out.tokens_per_forward, out


@pytest.fixture(params=["torch", "onnxruntime"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def load(backend: str, tiny_ckpt: Path, exports: dict[str, Path]) -> dgrt.runtime.generator.Generator:
    return dgrt.load(exports["tiny"] if backend == "onnxruntime" else tiny_ckpt, backend=backend)


@pytest.mark.parametrize("adaptive", [False, True])
def test_batch_of_two_matches_transformers(
    backend: str, adaptive: bool, tiny_ckpt: Path, exports: dict[str, Path]
) -> None:
    """3 canvases, batch 2, adaptive stopping off, or on with thresholds that make rows stop at different
    steps (random weights never repeat an argmax, so stability 0; their mean entropies fall from about 5.3
    to 4.7 nats over 8 steps, so a 5.1 bound stops rows mid-canvas)."""
    stop = (
        {"stability_threshold": 0, "confidence_threshold": 5.1}
        if adaptive
        else {"stability_threshold": None, "confidence_threshold": None}
    )
    ref, ref_tpf, _ = reference_generate(
        tiny_ckpt, PROMPTS, 7, max_new_tokens=48, eos_token_id=None, pad_token_id=None, **stop
    )
    ours = load(backend, tiny_ckpt, exports).generate(
        PROMPTS.tolist(), seed=7, max_new_tokens=48, steps=STEPS, eos_token_id=None, pad_token_id=None, **stop
    )
    assert torch.equal(torch.tensor(ours.tokens), ref)
    assert ours.tokens_per_forward == pytest.approx(ref_tpf.tolist())
    steps = [s for row in ours.steps_per_canvas for s in row]
    assert len(ours.steps_per_canvas[0]) == 3
    if adaptive:
        assert min(steps) < STEPS, "adaptive stopping never fired: the test would prove nothing"
    else:
        assert set(steps) == {STEPS}


def test_eos_in_one_row_pads_it_and_stops_early(backend: str, tiny_ckpt: Path, exports: dict[str, Path]) -> None:
    plain, _, _ = reference_generate(
        tiny_ckpt,
        PROMPTS,
        3,
        max_new_tokens=48,
        eos_token_id=None,
        pad_token_id=None,
        stability_threshold=None,
        confidence_threshold=None,
    )
    # An EOS id that row 1 emits in its first canvas and row 0 never emits: row 1 finishes early.
    eos = next(t for t in plain[1, 2:16].tolist() if t not in plain[0].tolist() and t != 0)
    kwargs = dict(
        max_new_tokens=48, eos_token_id=eos, pad_token_id=0, stability_threshold=None, confidence_threshold=None
    )
    ref, ref_tpf, _ = reference_generate(tiny_ckpt, PROMPTS, 3, **kwargs)
    ours = load(backend, tiny_ckpt, exports).generate(PROMPTS.tolist(), seed=3, steps=STEPS, **kwargs)
    assert torch.equal(torch.tensor(ours.tokens), ref)
    assert ours.tokens[1][16:] == [0] * 32 and eos in ours.tokens[1][:16]
    assert ours.tokens_per_forward == pytest.approx(ref_tpf.tolist())
    assert ours.steps_per_canvas[1] == [STEPS]  # the row finished in its first canvas


def test_second_turn_continues_from_the_cache(backend: str, tiny_ckpt: Path, exports: dict[str, Path]) -> None:
    kwargs = dict(
        max_new_tokens=32, eos_token_id=None, pad_token_id=None, stability_threshold=None, confidence_threshold=None
    )
    first, _, out = reference_generate(tiny_ckpt, PROMPTS[:1], 11, **kwargs)
    follow_up = torch.tensor([[40, 41, 42, 43, 44]])
    uncached = torch.cat([out.sequences[:, -16:], follow_up], dim=1)  # the last canvas is not cached
    second, _, _ = reference_generate(tiny_ckpt, uncached, 12, past_key_values=out.past_key_values, **kwargs)

    session = load(backend, tiny_ckpt, exports).session()
    assert session.generate(PROMPTS[0].tolist(), seed=11, steps=STEPS, **kwargs).tokens == first.tolist()
    assert session.generate(follow_up[0].tolist(), seed=12, steps=STEPS, **kwargs).tokens == second.tolist()
    assert session.cache.length == 12 + 16 + 16 + 5 + 16  # everything but the last canvas


def test_backends_agree_on_text_prompts_of_different_lengths(tiny_ckpt: Path, exports: dict[str, Path]) -> None:
    prompts = ["Hi", "Reverse the string 'diffusion'.", [{"role": "user", "content": "Sort: cba"}]]
    results = [
        dgrt.load(p, backend=b).generate(prompts, seed=5, steps=4, max_new_tokens=32)
        for p, b in ((tiny_ckpt, "torch"), (exports["tiny"], "onnxruntime"), (exports["tiny"], "torch"))
    ]
    assert results[0].tokens == results[1].tokens == results[2].tokens
    assert len(results[0].texts) == 3


def test_each_row_of_a_padded_batch_matches_its_prompt_alone(exports: dict[str, Path]) -> None:
    gen = dgrt.load(exports["tiny"])
    short, long = [2, 50, 51], [2, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69]
    opts = dict(
        steps=4,
        max_new_tokens=32,
        stability_threshold=None,
        confidence_threshold=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    batch = gen.generate([short, long], seed=9, **opts)
    assert batch.steps_per_canvas == [[4, 4], [4, 4]]
    # Alone, a row sees other random numbers; feed each the same draws by replaying the batch's stream.
    for row, prompt in enumerate((short, long)):
        alone = gen.generate([prompt, prompt], seed=9, **opts)  # same batch shape, same stream
        assert alone.tokens[row] == batch.tokens[row]


def test_seed_makes_runs_repeatable(exports: dict[str, Path]) -> None:
    gen = dgrt.load(exports["tiny"])
    a = gen.generate("Hello", seed=1, steps=4, max_new_tokens=16)
    b = gen.generate("Hello", seed=1, steps=4, max_new_tokens=16)
    c = gen.generate("Hello", seed=2, steps=4, max_new_tokens=16)
    assert a.tokens == b.tokens != c.tokens


def test_streaming_yields_drafts_then_canvases(exports: dict[str, Path]) -> None:
    events = list(
        dgrt.load(exports["tiny"]).stream(
            "Hello",
            seed=0,
            steps=3,
            max_new_tokens=32,
            eos_token_id=None,
            stability_threshold=None,
            confidence_threshold=None,
        )
    )
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["StepEvent"] * 3 + ["CanvasEvent"] + ["StepEvent"] * 3 + ["CanvasEvent"]
    assert [e.step for e in events if type(e).__name__ == "StepEvent"] == [3, 2, 1, 3, 2, 1]
    assert events[3].tokens.shape == (1, 16)


@pytest.mark.parametrize("bound, kept", [(1e-9, 1), (1e9, 16)])
def test_each_step_says_which_positions_the_sampler_kept(exports: dict[str, Path], bound: float, kept: int) -> None:
    """The lowest-entropy position is always kept; a bound of (almost) nothing keeps only it, a huge one all."""
    steps = dgrt.load(exports["tiny"]).stream("Hello", seed=0, steps=2, max_new_tokens=16, entropy_bound=bound)
    for event in steps:
        if type(event).__name__ == "StepEvent":
            assert event.accepted.shape == event.draft.shape == (1, 16)
            assert int(event.accepted.sum()) == kept


@pytest.fixture(scope="module")
def tiny(exports: dict[str, Path]) -> Generator:
    return dgrt.load(exports["tiny"])


@pytest.mark.parametrize(
    ("prompt", "options", "message"),
    [
        ("", {}, "the prompt is empty."),
        ([], {}, "no prompt given."),
        (["hi", []], {}, "the prompt is empty."),
        ([5, 999], {}, "token id 999 is outside the vocabulary (0 to 255)."),
        ("x" * 5000, {}, "exceeds the 4096 tokens this model supports"),
        (b"hi", {}, "a batch is a list of prompts or a 2-D integer array or tensor; got bytes."),
        ([1.0, 2.0], {}, "; got a list of float."),
        ([1, "a"], {}, "; got a list of int, str."),
        ([True, 1], {}, "; got a list of bool, int."),
        (np.array([1.0, 2.0]), {}, "; got a 1-D float64 numpy array."),
        (torch.tensor([[True]]), {}, "; got a 1-D bool torch tensor."),
        (np.zeros((1, 1, 1), dtype=np.int64), {}, "; got a 3-D int64 numpy array."),
        ({"role": "user", "content": "hi"}, {}, "; got dict."),
        ([{"role": "user", "content": 5}], {}, "chat message 0 is {'role': 'user', 'content': 5}, expected a dict"),
        ("a\ud800", {}, "the prompt holds '\\ud800' at character 1, a lone surrogate that the tokenizer cannot encode"),
        ([{"role": "user", "content": "\udcff"}], {}, "chat message 0 holds '\\udcff' at character 0"),
        ("hi", {"steps": 0}, "steps is 0, expected an integer from 1 to 10000."),
        ("hi", {"steps": "3"}, "steps is '3', expected an integer from 1 to 10000."),
        ("hi", {"t_min": 0.9}, "expected 0 <= t_min < t_max"),
        ("hi", {"t_max": float("inf")}, "t_max is inf, expected a finite number."),
        ("hi", {"steps": 4, "stability_threshold": 10**9}, "expected an integer from 0 to 4 (steps), or None;"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens is 0, expected an integer from 1 to 4096 (the model's context)."),
        ("hi", {"max_new_tokens": 2.5}, "max_new_tokens is 2.5, expected an integer"),
        ("hi", {"seed": 2**64}, "seed is 18446744073709551616, expected an integer from 0 to 2**63 - 1"),
        ("hi", {"seed": -1}, "seed is -1, expected an integer from 0 to 2**63 - 1"),
        ("hi", {"seed": 1.0}, "seed is 1.0, expected an integer"),
        ("hi", {"seed": True}, "seed is True, expected an integer"),
        ("hi", {"eos_token_id": [1, 256]}, "eos_token_id is 256, expected a token id (an integer from 0 to 255)"),
        ("hi", {"pad_token_id": -1}, "pad_token_id is -1, expected a token id (an integer from 0 to 255), or None."),
        ("hi", {"chat": "no"}, "chat is 'no', expected True"),
        ("hi", {"on_event": 3}, "on_event is 3, expected a callable"),
        ("hi", {"sampler": {"steps": 4}}, "sampler is {'steps': 4}, expected a SamplerConfig"),
        ("hi", {"sampler": SamplerConfig(steps=0)}, "steps is 0, expected an integer from 1 to 10000."),
        (
            "hi",
            {"temperature": 1.0},
            "unknown option(s) ['temperature']; the accepted options are max_new_tokens, seed, chat, eos_token_id, "
            "pad_token_id, sampler, on_event, steps, t_min, t_max, entropy_bound, stability_threshold, "
            "confidence_threshold.",
        ),
        ("hi", {"sesion": None}, "unknown option(s) ['sesion']"),
    ],
)
def test_bad_requests_give_one_clear_error(tiny: Generator, prompt: Any, options: dict[str, Any], message: str) -> None:
    with pytest.raises(dgrt.errors.DgrtError) as err:
        tiny.generate(prompt, **options)
    assert message in str(err.value)


def test_stream_checks_its_arguments_when_called(tiny: Generator) -> None:
    with pytest.raises(
        dgrt.errors.DgrtError, match=r"unknown option\(s\) \['on_event'\]; the accepted options are max"
    ):
        tiny.stream("hi", on_event=print)  # not iterated: the error comes from the call itself
    with pytest.raises(dgrt.errors.DgrtError, match="a session continues one conversation; pass one prompt"):
        tiny.session().stream(["a", "b"])


def test_a_sampler_config_runs_as_its_settings_given_as_keywords_which_override_it(tiny: Generator) -> None:
    as_keywords = tiny.generate("Hi", seed=0, max_new_tokens=16, steps=2, t_max=0.6)
    config = tiny.sampler.with_overrides(steps=2, t_max=0.6)
    as_config = tiny.generate("Hi", seed=0, max_new_tokens=16, sampler=config)
    assert as_config.steps_per_canvas == [[2]] and as_config.tokens == as_keywords.tokens
    assert tiny.generate("Hi", seed=0, max_new_tokens=16, sampler=config, steps=3).steps_per_canvas == [[3]]


def test_generate_stream_and_session_turns_take_the_same_typed_options() -> None:
    def options(method: Any) -> list[tuple[str, Any, Any]]:
        """(name, annotation, default) of each option, **settings included."""
        params = list(inspect.signature(method).parameters.values())[2:]  # after self and the prompts
        return [(p.name, p.annotation, p.default) for p in params]

    assert options(Session.generate) == options(Generator.generate)
    assert options(Session.stream) == options(Generator.stream)
    assert options(Generator.stream) == [o for o in options(Generator.generate) if o[0] != "on_event"]
    assert list(SamplerSettings.__annotations__) == [f.name for f in fields(SamplerConfig)]


def test_token_ids_may_be_lists_tuples_arrays_or_tensors(tiny: Generator) -> None:
    ids = [2, 50, 51, 52]
    expected = tiny.generate([ids, ids], seed=3, **FAST).tokens
    for batch in (
        [tuple(ids), np.array(ids)],
        torch.tensor([ids, ids]),
        np.array([ids, ids], dtype=np.int32),
        [torch.tensor(ids), [np.int64(t) for t in ids]],
    ):
        assert tiny.generate(batch, seed=np.int64(3), **FAST).tokens == expected
    alone = tiny.generate(ids, seed=3, **FAST).tokens  # a batch of one draws other random numbers
    for prompt in (tuple(ids), np.array(ids, dtype=np.uint8), torch.tensor(ids)):
        assert tiny.generate(prompt, seed=3, **FAST).tokens == alone


def test_chat_messages_are_the_templated_text(tiny: Generator) -> None:
    text = tiny.generate("Sort: cba", seed=0, **FAST).tokens
    assert tiny.generate([{"role": "user", "content": "Sort: cba"}], seed=0, **FAST).tokens == text
    assert tiny.generate("Sort: cba", seed=0, chat=False, **FAST).tokens != text


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_one_text_plain_and_heads_each_row_of_a_batch(
    exports: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = (str(exports["tiny"]), "--steps", "2", "--max-new-tokens", "16", "--seed", "1")
    code, out, _ = cli(capsys, *args, "Hi", "Bye", "--json")
    texts = json.loads(out)["texts"]
    assert code == 0 and len(texts) == 2
    assert cli(capsys, *args, "Hi", "Bye")[:2] == (0, f"--- [0]\n{texts[0]}\n--- [1]\n{texts[1]}\n")
    [text] = json.loads(cli(capsys, *args, "Hi", "--json")[1])["texts"]
    assert cli(capsys, *args, "Hi")[:2] == (0, f"{text}\n")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "as JSON, the format to parse" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hi", "--stability-threshold", "1000000000"], "stability_threshold is 1000000000, expected an integer"),
        (["hi", "--seed", "18446744073709551616"], "seed is 18446744073709551616, expected an integer from 0 to"),
        (["hi", "--t-max", "inf"], "t_max is inf, expected a finite number."),
        (["hi", "--t-min", "nan"], "t_min is nan, expected a finite number."),
        (["hi", "--eos-id", "1", "100000"], "eos_token_id is 100000, expected a token id"),
        ([os.fsdecode(b"caf\xe9")], "the prompt holds '\\udce9' at character 3, a lone surrogate"),  # not UTF-8
    ],
)
def test_cli_out_of_range_numbers_and_undecodable_text_are_one_error_line(
    exports: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = cli(capsys, str(exports["tiny"]), *args)
    assert (code, out) == (2, "") and err.startswith("dgrt: error: ") and err.count("\n") == 1
    assert message in err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "denoise.onnx").write_bytes(b"not onnx"), "does not match the denoise graph"),
        (lambda d: (d / "weights.bin").write_bytes(b"short"), "weights.bin has 5 bytes; manifest.json says"),
        (lambda d: (d / "weights.bin").unlink(), "weights.bin is missing"),
        (lambda d: (d / "manifest.json").write_text("{"), "manifest.json: not valid JSON"),
        (
            lambda d: (d / "manifest.json").write_text('{"format": "dgrt-export", "format_version": 99}'),
            "format_version 99 is not supported",
        ),
        (lambda d: (d / "manifest.json").unlink(), "neither an export directory"),
    ],
)
def test_corrupt_or_mismatched_exports_are_refused(tmp_path: Path, exports: dict[str, Path], damage, message) -> None:
    import shutil

    broken = tmp_path / "export"
    shutil.copytree(exports["tiny"], broken)
    damage(broken)
    with pytest.raises(dgrt.errors.DgrtError) as err:
        dgrt.load(broken)
    assert message in str(err.value)


def test_checkpoints_run_on_torch_only(tiny_ckpt: Path) -> None:
    with pytest.raises(dgrt.errors.DgrtError, match="the onnxruntime backend runs exports"):
        dgrt.load(tiny_ckpt, backend="onnxruntime")
    with pytest.raises(dgrt.errors.DgrtError, match="unknown backend 'tensorflow'"):
        dgrt.load(tiny_ckpt, backend="tensorflow")


def test_a_batch_larger_than_the_backend_takes_runs_in_parts(exports: dict[str, Path]) -> None:
    """A backend that takes 2 rows at a time (a TensorRT engine built with --max-batch 2): generate runs
    3 prompts as a batch of 2 and one of 1, each as it would alone; a stream of 3 is refused."""
    prompts = [[2, 17, 33], [2, 9, 8, 7], [2, 5]]
    with dgrt.load(exports["tiny"]) as gen:
        expected = gen.generate(prompts[:2], seed=4, **FAST).tokens + gen.generate(prompts[2:], seed=4, **FAST).tokens
        gen.backend.max_batch = 2
        result = gen.generate(prompts, seed=4, **FAST)
        assert result.tokens == expected and len(result.texts) == len(result.steps_per_canvas) == 3
        with pytest.raises(DgrtError, match="takes at most 2 rows at a time"):
            gen.stream(prompts, seed=4)
