"""Speed profiles on the tiny weights (CPU, fp32): exact where promised, no drift, no recompiles.

One compiled engine serves the module: its cold compile (the warm-up) is the expensive part.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import PIL.Image
import pytest
import torch
import torch._dynamo.utils
from pydantic import ValidationError
from torch._inductor.runtime import cache_dir_utils

from api_schemas.common import AdapterChoice, StepCache, Task
from api_schemas.jobs import JobParameters
from models.adapters import AdapterSet
from models.engine import Engine
from models.pipeline import DreamOmni2Pipeline
from models.settings import EngineSettings
from models.speed import FusedAdapters, SpeedProfileError

#: compiled vs reference on these weights, in 8-bit levels: measured at most 1, mean under 1e-4.
MAX_LEVELS = 2
MEAN_LEVELS = 0.01


def noise(width: int, height: int, seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    )


IMAGES = [noise(64, 64, 1), noise(80, 48, 2), noise(48, 80, 3), noise(64, 64, 4), noise(96, 32, 5)]
#: (image count, task) -> the adapter the rule picks.
JOBS = {
    (1, Task.EDIT): AdapterChoice.BASE,
    (2, Task.EDIT): AdapterChoice.EDIT,
    (2, Task.GENERATE): AdapterChoice.GENERATION,
}


def settings(tiny_cache, **values: object) -> EngineSettings:
    return EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", translator=False, **values)


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def run(
    engine: Engine, count: int, task: Task, steps: int = 3, **params: object
) -> tuple[np.ndarray, object]:
    job = JobParameters(instruction="x", task=task, steps=steps, seed=2, translate=False, **params)
    result = engine.run(IMAGES[:count], job)
    return np.asarray(result.image).astype(np.float64), result.metadata


@pytest.fixture(scope="module")
def reference(tiny_cache, tiny_loras) -> Engine:
    return Engine.from_settings(settings(tiny_cache, limits={"loras": json.dumps(tiny_loras)}))


@pytest.fixture(scope="module")
def compiled(tiny_cache, tiny_loras) -> Engine:
    # As a worker finds it after any earlier torch.compile in the process: torch's /tmp default set.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir_utils.default_cache_dir()
    # Up to three images of a job sampled together: the warm-up covers batches as well.
    # With the LoRAs of `tiny_loras` registered (ranks 2, 4 and 8; layers no DreamOmni2 LoRA adapts too).
    loras = {"loras": json.dumps(tiny_loras)}
    return Engine.from_settings(settings(tiny_cache, speed="compiled", batch_images=3, limits=loras))


@pytest.fixture(scope="module")
def warm_graphs(compiled) -> int:
    return graphs()


def test_compiled_agrees_with_reference_for_every_adapter(reference, compiled):
    outputs = {}
    for (count, task), adapter in JOBS.items():
        expected, meta = run(reference, count, task)
        got, compiled_meta = run(compiled, count, task)
        assert meta.adapter is compiled_meta.adapter is adapter
        assert compiled_meta.speed_profile == "compiled" and meta.speed_profile == "reference"
        diff = np.abs(got - expected)
        assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (adapter, diff.max(), diff.mean())
        outputs[adapter] = got
    # The LoRAs are in effect under fused q/k/v: the two differ on the same images far beyond tolerance.
    assert np.abs(outputs[AdapterChoice.EDIT] - outputs[AdapterChoice.GENERATION]).mean() > 50 * MEAN_LEVELS


def test_nothing_recompiles_after_warm_up(compiled, warm_graphs):
    for count in range(0, 6):  # every image count, buckets of three aspect ratios
        for task in (Task.EDIT, Task.GENERATE):
            if task is Task.EDIT and count == 0:
                continue
            run(compiled, count, task, steps=1)
    run(compiled, 2, Task.EDIT, step_cache=StepCache.TAYLORSEER)  # the cache hooks run outside
    for num_images in (2, 3, 4):  # batches of 2 and 3, and 3 + 1
        run(compiled, 1, Task.EDIT, steps=1, num_images=num_images)
        run(compiled, 2, Task.GENERATE, steps=1, num_images=num_images)
    assert graphs() == warm_graphs


def test_fifty_adapter_switches_never_drift(compiled, warm_graphs):
    firsts: dict[AdapterChoice, np.ndarray] = {}
    order = list(JOBS.items())
    for n in range(50):
        (count, task), adapter = order[(n * 7) % len(order)]  # an irregular order
        image, meta = run(compiled, count, task, steps=1)
        assert meta.adapter is adapter
        first = firsts.setdefault(adapter, image)
        assert np.array_equal(image, first), (n, adapter)
    assert set(firsts) == set(JOBS.values())
    assert graphs() == warm_graphs


#: Registered LoRAs of ranks 2, 4 and 8, alone, stacked, at several scales, on every adapter.
LORA_JOBS = [
    (2, Task.EDIT, None),
    (2, Task.EDIT, [{"name": "style"}]),
    (2, Task.EDIT, [{"name": "style", "scale": 0.3}]),
    (1, Task.EDIT, [{"name": "kohya"}, {"name": "comfy", "scale": -1.0}]),
    (2, Task.GENERATE, [{"name": "comfy", "scale": 2.0}, {"name": "style"}]),
    (1, Task.EDIT, [{"name": "comfy"}]),
]


def test_compiled_loras_agree_with_the_reference_side_path(reference, compiled):
    for count, task, loras in LORA_JOBS:
        expected, meta = run(reference, count, task, loras=loras)
        got, compiled_meta = run(compiled, count, task, loras=loras)
        assert meta.loras == compiled_meta.loras
        diff = np.abs(got - expected)
        assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (loras, diff.max(), diff.mean())


def test_switching_loras_scales_and_ranks_never_recompiles_or_drifts(compiled, warm_graphs):
    # The first run of each job right after the warm-up is what a fresh worker gives.
    firsts = [run(compiled, count, task, steps=1, loras=loras)[0] for count, task, loras in LORA_JOBS]
    order = [n for n in range(len(LORA_JOBS)) for _ in range(3)]
    random.Random(7).shuffle(order)
    for n in order:
        count, task, loras = LORA_JOBS[n]
        assert np.array_equal(run(compiled, count, task, steps=1, loras=loras)[0], firsts[n]), (n, loras)
    assert graphs() == warm_graphs
    plain = run(compiled, 2, Task.EDIT, steps=1)[0]
    scale_0 = [{"name": "kohya", "scale": 0}]
    assert np.array_equal(run(compiled, 2, Task.EDIT, steps=1, loras=scale_0)[0], plain)
    assert not np.array_equal(firsts[1], plain)


def test_the_reference_adapters_never_drift_either(reference):
    firsts: dict[AdapterChoice, np.ndarray] = {}
    for n in range(12):
        (count, task), adapter = list(JOBS.items())[n % 3]
        image = run(reference, count, task)[0]
        assert np.array_equal(image, firsts.setdefault(adapter, image))


def test_fused_qkv_keeps_each_lora_intact(tiny_root):
    # Eager, no compile: the fused adapters on fused q/k/v against peft's unfused LoRAs.
    def pipeline_with_loras() -> tuple[DreamOmni2Pipeline, AdapterSet]:
        pipe = DreamOmni2Pipeline.from_pretrained(tiny_root / "kontext")
        pipe.set_progress_bar_config(disable=True)
        return pipe, AdapterSet.load(pipe, edit=tiny_root / "edit_lora", generation=tiny_root / "gen_lora")

    def sample(pipe: DreamOmni2Pipeline) -> np.ndarray:
        return pipe(
            images=IMAGES[:2], prompt="x", num_inference_steps=3, max_area=64 * 64, resolution_buckets=None,
            generator=torch.Generator().manual_seed(3), output_type="np",
        ).images  # fmt: skip

    unfused, peft_adapters = pipeline_with_loras()
    fused_pipe, loaded = pipeline_with_loras()
    fused = FusedAdapters.from_peft(fused_pipe, loaded.names)
    assert all(
        getattr(m, "fused_projections", True)
        for m in fused_pipe.transformer.modules()
        if hasattr(m, "to_qkv")
    )
    results = {}
    for choice in (AdapterChoice.BASE, AdapterChoice.EDIT, AdapterChoice.GENERATION):
        peft_adapters.activate(choice)
        fused.activate(choice)
        results[choice] = (sample(unfused), sample(fused_pipe))
    tolerance = 1e-4
    for choice, (peft_out, fused_out) in results.items():
        assert np.abs(peft_out - fused_out).max() < tolerance, choice
    base = results[AdapterChoice.BASE][0]
    for choice in (AdapterChoice.EDIT, AdapterChoice.GENERATION):
        assert np.abs(results[choice][1] - base).mean() > 100 * tolerance, choice


def test_fp8_is_refused_where_there_is_no_fp8(tiny_cache):
    with pytest.raises(SpeedProfileError, match="compute capability 8.9"):
        Engine.from_settings(settings(tiny_cache, speed="fp8"))


@pytest.mark.parametrize("memory", ["low", "stream"])
def test_compiled_needs_the_transformer_resident(tiny_cache, memory):
    with pytest.raises(ValidationError, match="resident in bf16"):
        settings(tiny_cache, speed="compiled", memory=memory)


def test_the_compile_artifacts_land_in_the_compile_cache(tiny_cache, compiled):
    # A restarted worker finds them there (the model volume), not in torch's default under /tmp.
    cache = settings(tiny_cache).torch_compile_dir
    assert cache_dir_utils.cache_dir() == str(cache)
    assert any((cache / "fxgraph").rglob("*")), sorted(p.name for p in cache.iterdir())


def test_the_worker_reports_its_profile(compiled):
    speed = compiled.describe()["speed"]
    assert speed["profile"] == "compiled" and speed["attention_backend"] == "native"
    # q/k/v, the added q/k/v, to_out and to_add_out; the registered LoRAs add an MLP and proj_out.
    assert speed["fused_adapter_weights"] == 7 and speed["warmup_s"] > 0


# The two tests below reset dynamo, which drops the shared compiled engine's graphs: they stay last.
def test_a_machine_that_cannot_compile_serves_with_reference(tiny_cache, tmp_path, caplog):
    # As a GPU image without a C compiler (Triton builds a launcher with one): the profile is not
    # applied, the worker serves the reference path and says why, instead of crash-looping.
    import torch._inductor.config as inductor

    with inductor.patch({"cpp.cxx": (None, "/nonexistent/c++")}):
        engine = Engine.from_settings(settings(tiny_cache, speed="compiled", compile_cache_dir=tmp_path))
    speed = engine.describe()["speed"]
    assert speed["fallback"] == "reference" and "No working C++ compiler" in speed["error"]
    assert isinstance(engine.adapters, AdapterSet) and speed["fused_adapter_weights"] == 0
    assert "cannot compile on this machine" in caplog.text
    got, meta = run(engine, 2, Task.EDIT)
    assert meta.speed_profile == "reference" and meta.adapter is AdapterChoice.EDIT  # what ran


def test_a_warm_up_that_fails_to_compile_runs_the_blocks_eagerly(
    tiny_cache, tmp_path, reference, monkeypatch
):
    from torch._inductor import compile_fx

    real, calls = compile_fx.compile_fx, []

    def broken(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:  # the start-up check's small function compiles; the blocks do not
            return real(*args, **kwargs)
        raise RuntimeError("injected: Inductor could not compile this graph")

    engine_settings = settings(tiny_cache, speed="compiled", compile_cache_dir=tmp_path)
    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    torch._dynamo.reset()
    try:
        engine = Engine.from_settings(engine_settings)
        speed = engine.describe()["speed"]
        assert speed["fallback"] == "eager" and "injected" in speed["error"]
        for (count, task), adapter in JOBS.items():
            got, meta = run(engine, count, task)
            expected, _ = run(reference, count, task)
            assert meta.adapter is adapter and meta.speed_profile == "compiled-eager"
            assert np.abs(got - expected).max() <= MAX_LEVELS  # fused weights, run eagerly
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()
