"""Step caches per job: none by default, exact when set never to skip, fewer passes when they skip."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from pydantic import ValidationError

from api_schemas.common import StepCache
from api_schemas.errors import InvalidInput
from api_schemas.jobs import JobLimits, JobParameters
from models.engine import Engine
from models.settings import EngineSettings

STEPS = 12
IMAGES = [
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for seed in (1, 2)
]


def engine_with(tiny_cache, **settings: object) -> Engine:
    return Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", translator=False, **settings)
    )


def run(engine: Engine, step_cache: StepCache | None = None):
    params = JobParameters(instruction="x", steps=STEPS, seed=4, translate=False, step_cache=step_cache)
    result = engine.run(IMAGES, params)
    return np.asarray(result.image).astype(np.float64), result.metadata


@pytest.fixture(scope="module")
def engine(tiny_cache) -> Engine:
    # A high First Block threshold: the tiny random model's first block changes a lot every step.
    return engine_with(tiny_cache, first_block_threshold=10.0, taylorseer_interval=3)


@pytest.fixture(scope="module")
def reference(engine):
    return run(engine)


def test_no_cache_by_default_and_every_step_is_a_full_pass(reference):
    _, meta = reference
    assert meta.step_cache is StepCache.NONE and meta.transformer_evaluations == STEPS
    assert meta.speed_profile == "reference"


@pytest.mark.parametrize("policy", [StepCache.FIRST_BLOCK, StepCache.TAYLORSEER])
def test_a_cache_skips_passes_and_stays_near(engine, reference, policy):
    image, meta = run(engine, policy)
    assert meta.step_cache is policy
    assert 0 < meta.transformer_evaluations < STEPS
    diff = np.abs(image - reference[0])
    assert 0 < diff.mean() < 40  # a real change, not noise: the cache approximates the skipped passes


def test_taylorseer_follows_its_fixed_schedule(engine):
    _, meta = run(engine, StepCache.TAYLORSEER)
    # Three warm-up steps in full, then one full step in three: 3 + ceil(9 / 3).
    assert meta.transformer_evaluations == 6


@pytest.mark.parametrize(
    ("policy", "settings"),
    [
        (StepCache.FIRST_BLOCK, {"first_block_threshold": 0.0}),
        (StepCache.TAYLORSEER, {"taylorseer_interval": 1}),
    ],
)
def test_a_cache_set_never_to_skip_is_bit_identical_to_none(tiny_cache, reference, policy, settings):
    image, meta = run(engine_with(tiny_cache, **settings), policy)
    assert meta.transformer_evaluations == STEPS
    assert np.array_equal(image, reference[0])


def test_caches_go_off_after_the_job(engine, reference):
    run(engine, StepCache.FIRST_BLOCK)
    again, meta = run(engine)
    assert np.array_equal(again, reference[0]) and meta.transformer_evaluations == STEPS


def test_a_cache_works_with_the_memory_modes(tiny_cache):
    for mode in ("low", "stream"):
        engine = engine_with(tiny_cache, memory=mode, taylorseer_interval=3)
        assert run(engine, StepCache.TAYLORSEER)[1].transformer_evaluations == 6


def test_a_policy_the_deployment_leaves_out_is_refused(tiny_cache, monkeypatch):
    monkeypatch.setenv("DREAMOMNI2_STEP_CACHES", "first_block")
    engine = engine_with(tiny_cache)
    with pytest.raises(InvalidInput) as info:
        run(engine, StepCache.TAYLORSEER)
    assert info.value.code == "step_cache_not_allowed" and "first_block" in info.value.message
    assert run(engine, StepCache.NONE)[1].step_cache is StepCache.NONE


def test_the_deployment_default(monkeypatch):
    monkeypatch.setenv("DREAMOMNI2_STEP_CACHE", "taylorseer")
    assert JobLimits().step_cache is StepCache.TAYLORSEER
    monkeypatch.setenv("DREAMOMNI2_STEP_CACHES", "first_block")
    with pytest.raises(ValidationError, match="DREAMOMNI2_STEP_CACHE=taylorseer"):
        JobLimits()
