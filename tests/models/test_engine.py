"""Engine: adapters per job, translation metadata, progress, cancel, limits, bad input."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

from api_schemas.common import AdapterChoice, Task
from api_schemas.errors import InvalidInput, JobCanceled, PayloadTooLarge
from api_schemas.jobs import JobParameters, choose_adapter
from models.engine import Engine
from models.pipeline import DreamOmni2Pipeline
from models.settings import EngineSettings


def noise_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(tiny_cache) -> Engine:
    return Engine.from_settings(EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu"))


def params(**kwargs: object) -> JobParameters:
    kwargs.setdefault("instruction", "make the bag in image 1 use the pattern of the dress in image 2")
    kwargs.setdefault("steps", 3)
    kwargs.setdefault("seed", 11)
    return JobParameters(**kwargs)


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize(
    ("task", "count", "expected"),
    [
        (Task.EDIT, 1, AdapterChoice.BASE),
        (Task.EDIT, 2, AdapterChoice.EDIT),
        (Task.EDIT, 5, AdapterChoice.EDIT),
        (Task.GENERATE, 0, AdapterChoice.BASE),
        (Task.GENERATE, 1, AdapterChoice.GENERATION),
        (Task.GENERATE, 2, AdapterChoice.GENERATION),
        (Task.GENERATE, 5, AdapterChoice.GENERATION),
    ],
)
def test_adapter_rule(task, count, expected):
    assert choose_adapter(task, count) is expected


@pytest.mark.parametrize(
    ("task", "count"),
    [(None, 0), (None, 1), (None, 2), (None, 5), (Task.GENERATE, 1), (Task.GENERATE, 2), (Task.GENERATE, 5)],
)
def test_end_to_end_jobs(engine, task, count):
    images = [noise_image(64 + 16 * n, 64, n) for n in range(count)]
    result = engine.run(images, params(task=task))
    meta = result.metadata
    assert meta.task is (task or (Task.EDIT if count else Task.GENERATE))
    assert meta.adapter is choose_adapter(meta.task, count)
    assert meta.image_count == count
    assert result.image.size == (meta.width, meta.height)
    assert set(meta.timings) == {"translate", "encode", "denoise", "decode", "total"}
    # A random tiny VLM never answers in the tagged format: the instruction is used and the raw kept.
    assert meta.translated is False and meta.fallback_reason in {"unparseable", "empty", "truncated"}
    assert meta.translation_raw is not None
    assert meta.prompt == params().instruction


def test_edit_output_keeps_the_aspect_of_image_1(engine):
    result = engine.run([noise_image(128, 64, 1), noise_image(64, 64, 2)], params(translate=False))
    assert result.image.width > result.image.height


def test_generation_size_sets_the_aspect(engine):
    result = engine.run([], params(task=Task.GENERATE, width=2048, height=1024, translate=False))
    # The area is the preset's; only the aspect ratio comes from the request (floored to 16 px).
    assert abs(result.image.width / result.image.height - 2) < 0.6


def test_an_answer_cut_by_the_budget_says_so(engine):
    # The random tiny VLM never stops by itself: its answers always run into the budget.
    meta = engine.run([noise_image(64, 64, 1)], params()).metadata
    assert meta.translation_tokens == engine.translator.max_new_tokens == engine.settings.translator_budget
    assert meta.translated is False and meta.fallback_reason == "truncated"


def test_translation_can_be_turned_off_per_job(engine):
    meta = engine.run([noise_image(64, 64, 1)], params(translate=False)).metadata
    assert meta.translated is False and meta.fallback_reason == "disabled_by_request"
    assert meta.translation_raw is None


def test_deployment_without_translator(tiny_cache):
    engine = Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", translator=False)
    )
    assert engine.translator is None
    meta = engine.run([noise_image(64, 64, 1)], params()).metadata
    assert meta.fallback_reason == "disabled_by_deployment"


def test_adapters_differ_disabled_equals_base_and_switching_back_reproduces(engine, tiny_root):
    images = [noise_image(64, 64, 1), noise_image(64, 64, 2)]
    kwargs = dict(
        prompt="p", num_inference_steps=2, max_area=64 * 64, resolution_buckets=None, output_type="np"
    )

    def sample(choice: AdapterChoice) -> np.ndarray:
        import torch

        engine.adapters.activate(choice)
        return engine.pipeline(images=images, generator=torch.Generator().manual_seed(1), **kwargs).images

    edit = sample(AdapterChoice.EDIT)
    gen = sample(AdapterChoice.GENERATION)
    base = sample(AdapterChoice.BASE)
    edit_again = sample(AdapterChoice.EDIT)
    assert not np.array_equal(edit, gen)
    assert not np.array_equal(edit, base) and not np.array_equal(gen, base)
    assert np.array_equal(edit, edit_again)

    import torch

    plain = DreamOmni2Pipeline.from_pretrained(tiny_root / "kontext")
    plain.set_progress_bar_config(disable=True)
    no_lora = plain(images=images, generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.array_equal(base, no_lora)


def test_same_seed_same_result(engine):
    images = [png_bytes(noise_image(64, 64, 1)), png_bytes(noise_image(48, 64, 2))]
    a = engine.run(images, params())
    b = engine.run(images, params())
    assert a.metadata.seed == b.metadata.seed == 11
    assert np.array_equal(pixels(a.image), pixels(b.image))


def test_several_images_equal_one_image_jobs_with_the_following_seeds(engine):
    images = [png_bytes(noise_image(64, 64, 1)), png_bytes(noise_image(48, 64, 2))]
    events = []
    several = engine.run(images, params(num_images=2), on_progress=lambda *e: events.append(e[:3]))
    assert several.metadata.seed == 11 and several.metadata.seeds == [11, 12]
    assert len(several.images) == 2
    for image, seed in zip(several.images, [11, 12], strict=True):
        alone = engine.run(images, params(seed=seed))
        assert alone.metadata.seeds == [seed]
        assert np.array_equal(pixels(image), pixels(alone.image))
    assert not np.array_equal(pixels(several.images[0]), pixels(several.images[1]))
    # One run of 2 x 3 steps, counted through.
    assert [e for e in events if e[0] == "denoise"] == [("denoise", i, 6) for i in range(1, 7)]


def test_random_seed_is_reported(engine):
    meta = engine.run([], params(seed=None, task=Task.GENERATE, translate=False)).metadata
    assert isinstance(meta.seed, int) and meta.seed >= 0


def test_progress_reports_every_step(engine):
    events = []
    engine.run([noise_image(64, 64, 1)], params(steps=4), on_progress=lambda *e: events.append(e))
    denoise = [e for e in events if e[0] == "denoise"]
    assert denoise == [("denoise", i, 4) for i in range(1, 5)]
    assert events[0][0] == "translate" and events[-1][0] == "decode"


def test_cancel_mid_denoise_then_the_next_job_runs(engine):
    steps = []

    def on_progress(stage, step, total):
        if stage == "denoise":
            steps.append(step)

    with pytest.raises(JobCanceled):
        engine.run(
            [noise_image(64, 64, 1)],
            params(steps=10),
            on_progress=on_progress,
            should_cancel=lambda: len(steps) >= 3,
        )
    assert steps == [1, 2, 3]
    assert engine.run([noise_image(64, 64, 1)], params(steps=2)).image is not None


def test_cancel_before_sampling(engine):
    with pytest.raises(JobCanceled):
        engine.run([], params(task=Task.GENERATE), should_cancel=lambda: True)


@pytest.mark.parametrize(
    ("count", "kwargs", "code", "words"),
    [
        (6, {}, "too_many_images", "at most 5"),
        (0, {"task": Task.EDIT}, "edit_needs_image", "image 1"),
        (1, {"instruction": "   "}, "empty_instruction", "empty"),
        (1, {"instruction": "x" * 2001}, "instruction_too_long", "2000"),
        (1, {"steps": 0}, "invalid_steps", "between 1 and 100"),
        (1, {"steps": 101}, "invalid_steps", "between 1 and 100"),
        (1, {"guidance": -1.0}, "invalid_guidance", "between"),
        (0, {"task": Task.GENERATE, "width": 32}, "invalid_width", "between 64 and 4096"),
        (0, {"task": Task.GENERATE, "width": 5000, "height": 1024}, "invalid_width", "4096"),
        (0, {"task": Task.GENERATE, "width": 4096, "height": 512}, "invalid_size", "aspect ratio"),
        (1, {"task": Task.EDIT, "width": 512}, "size_with_edit", "generation only"),
        (1, {"num_images": 0}, "invalid_num_images", "between 1 and 4"),
        (1, {"num_images": 5}, "invalid_num_images", "between 1 and 4"),
        (1, {"num_images": 2, "seed": 2**53 - 1}, "invalid_seed", "between 0 and"),
        (
            0,
            {"instruction": None, "source_prompt": "a", "target_prompt": "b", "num_images": 2},
            "invalid_num_images",
            "one pair per job",
        ),
    ],
)
def test_refusals_name_the_limit(engine, count, kwargs, code, words):
    images = [noise_image(64, 64, n) for n in range(count)]
    with pytest.raises(InvalidInput) as info:
        engine.run(images, params(**kwargs))
    assert info.value.code == code
    assert words in info.value.message
    assert 400 <= info.value.http_status < 500


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "invalid_image"),
        (b"definitely not an image", "invalid_image"),
    ],
)
def test_bad_image_bytes_are_refused(engine, data, code):
    with pytest.raises(InvalidInput) as info:
        engine.run([data], params())
    assert info.value.code == code
    assert "image 1" in info.value.message


def test_truncated_image_is_refused_and_names_its_position(engine):
    good = png_bytes(noise_image(64, 64, 1))
    with pytest.raises(InvalidInput) as info:
        engine.run([good, good[: len(good) // 2]], params())
    assert "image 2" in info.value.message


def test_oversized_upload_is_refused(tiny_cache, monkeypatch):
    monkeypatch.setenv("DREAMOMNI2_MAX_IMAGE_BYTES", "1000")
    engine = Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", translator=False)
    )
    with pytest.raises(PayloadTooLarge):
        engine.run([png_bytes(noise_image(64, 64, 1))], params())


def test_dreamomni2_preset_loads_the_published_layout_from_local_folders(tiny_root, tmp_path):
    # The real preset's code path (base model folder + adapters folder holding edit_lora/, gen_lora/,
    # vlm-model/), pointed at local folders in the published layout; only the sizes are shrunk.
    settings = EngineSettings(
        preset="dreamomni2",
        base_model=str(tiny_root / "kontext"),
        adapters=str(tiny_root),
        cache_dir=tmp_path,
        device="cpu",
        max_area=64 * 64,
        bucket_scale=1 / 16,
        translator_max_new_tokens=4,
    )
    engine = Engine.from_settings(settings)
    assert not any(tmp_path.iterdir())  # nothing built: the given folders were used
    meta = engine.run([noise_image(64, 64, 1), noise_image(64, 64, 2)], params()).metadata
    assert meta.adapter is AdapterChoice.EDIT and meta.translation_raw is not None


def test_images_sampled_as_one_batch_stay_close_to_one_image_jobs(engine, tiny_cache):
    batched = Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", batch_images=2)
    )
    assert batched.batch_size == 2 and engine.batch_size == 1  # `auto` on a CPU: one after another
    assert batched.describe()["batch_images"] == 2
    images = [png_bytes(noise_image(64, 64, 1)), png_bytes(noise_image(48, 64, 2))]
    events = []
    several = batched.run(images, params(num_images=3), on_progress=lambda *e: events.append(e[:3]))
    assert several.metadata.seeds == [11, 12, 13] and several.metadata.batch_size == 2
    # Two rounds (seeds 11 and 12 together, then 13) of 3 steps, counted through.
    assert [e for e in events if e[0] == "denoise"] == [("denoise", i, 6) for i in range(1, 7)]
    for n, seed in enumerate([11, 12, 13]):
        alone = pixels(engine.run(images, params(seed=seed)).image).astype(int)
        got = pixels(several.images[n]).astype(int)
        if n == 2:
            assert np.array_equal(got, alone)  # a round of one is the one-image job, bit for bit
        else:
            assert np.abs(got - alone).max() <= 1, seed  # batched sums in another order: within a level
    assert not np.array_equal(pixels(several.images[0]), pixels(several.images[1]))
