"""Live previews: the latent-to-RGB picture and its data URI, the estimate they start from, and the
engine's previews on progress (every N steps, every kind of job, the sampled images unchanged)."""

from __future__ import annotations

import base64
import gc
import io
import weakref

import numpy as np
import PIL.Image
import pytest
import torch

from api_schemas.common import AdapterChoice, StepCache, Task
from api_schemas.jobs import JobParameters
from models.engine import Engine
from models.pipeline import DreamOmni2Pipeline
from models.preview import (
    FLUX_LATENT_RGB_BIAS,
    FLUX_LATENT_RGB_FACTORS,
    PREVIEW_MAX_SIDE,
    latent_rgb,
    preview_due,
    preview_image,
    render_preview,
)
from models.settings import EngineSettings

PREFIX = "data:image/jpeg;base64,"
#: A 1024x1024 preview's data URI from random latents, the worst case for JPEG (measured: 7.9k characters).
MAX_URI_CHARS_1024 = 10_000


def decode(uri: str) -> PIL.Image.Image:
    assert uri.startswith(PREFIX), uri[:40]
    image = PIL.Image.open(io.BytesIO(base64.b64decode(uri.removeprefix(PREFIX), validate=True)))
    assert image.format == "JPEG"
    return image


def latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def noise_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


# The picture -----------------------------------------------------------------------------------------
def test_preview_due_every_n_steps_and_never_at_zero():
    assert [step for step in range(1, 13) if preview_due(step, 5)] == [5, 10]
    assert [step for step in range(1, 4) if preview_due(step, 1)] == [1, 2, 3]
    assert not any(preview_due(step, 0) for step in range(1, 50))


def test_the_projection_is_the_published_linear_map():
    # A latent pixel of zeros is the bias; one channel at 1 adds that channel's row.
    pixels = torch.zeros(1, 16, 1, 2)
    pixels[0, 3, 0, 1] = 1.0
    rgb = latent_rgb(pixels)
    bias = torch.tensor(FLUX_LATENT_RGB_BIAS)
    row = torch.tensor(FLUX_LATENT_RGB_FACTORS[3])
    expected = torch.stack([bias, bias + row])
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 2, 3)
    assert torch.equal(rgb[0], ((expected + 1) * 127.5).round().to(torch.uint8))
    # Far outside [-1, 1]: clamped, never wrapped around.
    assert set(latent_rgb(torch.full((1, 16, 2, 2), 1e4)).unique().tolist()) <= {0, 255}


def test_a_batch_is_side_by_side_in_order():
    pair = latents(2, 16, 5, 7)
    rgb = latent_rgb(pair)
    assert rgb.shape == (5, 14, 3)
    assert torch.equal(rgb[:, :7], latent_rgb(pair[:1])) and torch.equal(rgb[:, 7:], latent_rgb(pair[1:]))


def test_the_picture_has_one_pixel_per_latent_and_shrinks_only_past_the_limit():
    assert preview_image(latents(1, 16, 128, 128)).size == (128, 128)  # 1024x1024
    assert preview_image(latents(1, 16, 84, 196)).size == (196, 84)  # 1568x672, the widest bucket
    wide = preview_image(latents(2, 16, 64, 256))  # a 2048x512 pair: 512x64 side by side
    assert wide.size == (PREVIEW_MAX_SIDE, 32)


def test_a_data_uri_of_a_few_kb_and_deterministic():
    full = latents(1, 16, 128, 128, seed=3)
    uri = render_preview(full)
    assert decode(uri).size == (128, 128)
    assert len(uri) < MAX_URI_CHARS_1024
    assert render_preview(full.clone()) == uri
    assert decode(render_preview(latents(1, 16, 8, 8))).size == (8, 8)  # the tiny preset's 64x64


def test_wrong_shapes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="unpack them first"):
        latent_rgb(latents(1, 16, 64))  # packed
    with pytest.raises(ValueError, match=r"\(batch, 16, h, w\)"):
        latent_rgb(latents(1, 4, 8, 8))


def test_no_graph_and_no_reference_kept():
    source = latents(1, 16, 8, 8).requires_grad_(True)
    kept = weakref.ref(source)
    assert not latent_rgb(source).requires_grad
    render_preview(source * 2)  # a tensor with a graph behind it
    assert torch.is_grad_enabled()
    del source
    gc.collect()
    assert kept() is None


# The estimate ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_cache) -> Engine:
    return Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", translator=False)
    )


def test_the_estimate_is_x_minus_sigma_v_and_the_final_latents_at_the_end(engine):
    pipe = engine.pipeline
    engine.adapters.activate(AdapterChoice.BASE)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []

    def on_step_end(p: DreamOmni2Pipeline, step: int, t: torch.Tensor, tensors: dict) -> dict:
        sigma = float(p.scheduler.sigmas[step])  # the sigma this step started from
        estimate = p.denoised_latents(tensors["latents"], tensors["noise_pred"])
        seen.append((tensors["latents"].clone(), tensors["noise_pred"].clone(), estimate, sigma))
        return {}

    out = pipe(
        prompt="a red bag", generator=torch.Generator().manual_seed(1), num_inference_steps=4,
        height=64, width=48, max_area=64 * 48, resolution_buckets=None, output_type="latent",
        callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents", "noise_pred"],
    )  # fmt: skip
    unpack = DreamOmni2Pipeline._unpack_latents
    for (before, _, _, _), (_, velocity, estimate, sigma) in zip(seen, seen[1:], strict=False):
        # x0 from the latents the step started from: x_t - sigma_t * v.
        assert estimate.shape == (1, 16, 8, 6)
        torch.testing.assert_close(estimate, unpack(before - sigma * velocity, 64, 48, 8))
    assert torch.equal(seen[-1][2], unpack(out.images, 64, 48, 8))  # sigma 0 after the last step


# The engine ------------------------------------------------------------------------------------------
def run(
    engine: Engine, job: JobParameters, every: int, images: list[PIL.Image.Image] | None = None
) -> tuple[list[tuple], np.ndarray]:
    events: list[tuple] = []

    def on_progress(stage: str, step: int, total: int, *, preview: str | None = None) -> None:
        events.append((stage, step, total, preview))

    output = engine.run(images or [], job, on_progress=on_progress, preview_every=every)
    return events, np.stack([np.asarray(image) for image in output.images])


def generation(**fields: object) -> JobParameters:
    return JobParameters(**{"instruction": "a red bag", "task": Task.GENERATE, "seed": 5, **fields})


@pytest.mark.parametrize("inputs", [0, 2], ids=["generation", "edit with a reference"])
def test_previews_every_n_steps_and_the_image_unchanged(engine, inputs):
    job = generation(steps=7, task=Task.EDIT) if inputs else generation(steps=7)
    images = [noise_image(96, 64, seed) for seed in range(inputs)]
    events, image = run(engine, job, every=3, images=images)
    denoise = [(step, preview is not None) for stage, step, _, preview in events if stage == "denoise"]
    assert denoise == [(n, n in (3, 6)) for n in range(1, 8)]
    assert all(preview is None for stage, *_, preview in events if stage != "denoise")
    height, width = image.shape[1:3]
    assert {decode(preview).size for *_, preview in events if preview} == {(width // 8, height // 8)}
    assert np.array_equal(run(engine, job, every=1, images=images)[1], image)
    assert np.array_equal(run(engine, job, every=0, images=images)[1], image)
    assert np.array_equal(np.asarray(engine.run(images, job).image), image[0])


def test_without_previews_the_callback_never_gets_one(engine):
    events = []
    engine.run([], generation(steps=5), on_progress=lambda *event: events.append(event))
    assert [event for event in events if event[0] == "denoise"] == [("denoise", n, 5) for n in range(1, 6)]


def test_a_feature_mixing_pair_previews_both_branches_side_by_side(engine):
    job = JobParameters(
        task=Task.FEATURE_MIXING, source_prompt="a teapot", target_prompt="a cat", steps=2, seed=2
    )
    events, images = run(engine, job, every=1)
    previews = [preview for stage, *_, preview in events if stage == "denoise"]
    assert len(previews) == 2 and {decode(preview).size for preview in previews} == {(16, 8)}
    assert np.array_equal(run(engine, job, every=0)[1], images)


@pytest.mark.parametrize("cache", [StepCache.FIRST_BLOCK, StepCache.TAYLORSEER])
def test_previews_with_a_step_cache(engine, cache):
    job = generation(steps=6, step_cache=cache)
    events, image = run(engine, job, every=2)
    assert [step for stage, step, _, preview in events if preview] == [2, 4, 6]
    assert np.array_equal(run(engine, job, every=0)[1], image)
