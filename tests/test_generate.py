"""dgrt's block-diffusion loop against transformers' DiffusionGemma generate, token for token.

Both sides consume the same random numbers: transformers draws its canvases and renoise tokens from the
global torch generator, which `torch.manual_seed(seed)` puts in the same state as dgrt's seeded
generator; its torch.multinomial is replaced by the inverse-CDF draw dgrt's denoise graph makes from one
uniform number per position, taken from that same stream in the same order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dgrt
from dgrt.validate import inverse_cdf_multinomial

transformers = pytest.importorskip("transformers", reason="the reference extra (transformers==5.23.0) is needed")

STEPS = 8
PROMPTS = torch.tensor([[2, 17, 33, 49, 65, 81, 97, 113, 129, 145, 161, 177], [2, 9, 8, 7, 6, 5, 4, 3, 22, 23, 24, 25]])


def reference_generate(path: Path, ids: torch.Tensor, seed: int, **kwargs):
    """transformers' generate with dgrt's sampling draw; returns (new tokens, tokens_per_forward, output)."""
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


@pytest.mark.parametrize(
    ("prompt", "options", "message"),
    [
        ("", {}, "the prompt is empty"),
        ([], {}, "no prompt given"),
        ([5, 999], {}, "token id 999 is outside the vocabulary (0 to 255)"),
        ("x" * 5000, {}, "exceeds the 4096 tokens this model supports"),
        ("hi", {"steps": 0}, "steps is 0, expected a positive integer"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens is 0"),
        ("hi", {"t_min": 0.9}, "expected 0 <= t_min < t_max"),
        ("hi", {"temperature": 1.0}, "unknown sampler setting(s) ['temperature']"),
    ],
)
def test_bad_requests_give_one_clear_error(exports: dict[str, Path], prompt, options, message: str) -> None:
    with pytest.raises(dgrt.errors.DgrtError) as err:
        dgrt.load(exports["tiny"]).generate(prompt, **options)
    assert message in str(err.value)


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
