"""Memory modes on the tiny weights: every mode runs every adapter, offloading changes nothing, fp8 is close.

On a CPU the host and the device are the same memory, so the moves copy nothing; what these tests pin
down is everything else: the same code path in every mode, the adapters intact, the exact results
of the offload modes, the bounded fp8 difference, and which models are on the device in which stage.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.hooks.group_offloading import _is_group_offload_enabled

from api_schemas.common import AdapterChoice, Task
from api_schemas.errors import JobCanceled
from api_schemas.jobs import JobParameters
from models.engine import Engine
from models.modes import MODES, Group, MemoryMode, Residency
from models.settings import EngineSettings

# Square inputs: every job below has the same 64x64 output, so the adapter is the only difference
# between the edit and generation jobs on the same images.
IMAGES = [
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for seed in (1, 2)
]
JOBS = {
    AdapterChoice.EDIT: (IMAGES, Task.EDIT),
    AdapterChoice.GENERATION: (IMAGES, Task.GENERATE),
    AdapterChoice.BASE: (IMAGES[:1], Task.EDIT),
    "generation_one_image": (IMAGES[:1], Task.GENERATE),
}
#: Measured on these weights with per-row fp8 scales (`python bench/memory_modes.py`): mean 0.5-0.9 and
#: at most 13 levels of 255 away from resident, against 17 levels of mean difference between two
#: adapters.
FP8_MEAN_BOUND = 3.0
FP8_MAX_BOUND = 32


def engine_for(tiny_cache, mode: MemoryMode, **kwargs: object) -> Engine:
    return Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", memory=mode, **kwargs)
    )


def run_all(engine: Engine) -> dict:
    outputs = {}
    for key, (images, task) in JOBS.items():
        result = engine.run(
            images, JobParameters(instruction="make it so", task=task, steps=4, seed=3, translate=False)
        )
        if isinstance(key, AdapterChoice):
            assert result.metadata.adapter is key
        outputs[key] = np.asarray(result.image).astype(np.float64)
    return outputs


@pytest.fixture(scope="module")
def outputs(tiny_cache) -> dict[MemoryMode, dict]:
    return {mode: run_all(engine_for(tiny_cache, mode, translator=False)) for mode in MemoryMode}


@pytest.mark.parametrize("mode", [MemoryMode.BALANCED, MemoryMode.STREAM])
def test_offload_modes_equal_resident_exactly(outputs, mode):
    for key, image in outputs[mode].items():
        assert np.array_equal(image, outputs[MemoryMode.RESIDENT][key]), key


def test_fp8_storage_stays_close_to_resident(outputs):
    for key, image in outputs[MemoryMode.LOW].items():
        diff = np.abs(image - outputs[MemoryMode.RESIDENT][key])
        assert 0 < diff.mean() <= FP8_MEAN_BOUND, key  # fp8 is really in use, and close
        assert diff.max() <= FP8_MAX_BOUND, key


@pytest.mark.parametrize("mode", list(MemoryMode))
def test_the_adapters_change_the_output_in_every_mode(outputs, mode):
    out = outputs[mode]
    edit_vs_gen = np.abs(out[AdapterChoice.EDIT] - out[AdapterChoice.GENERATION]).mean()
    base_vs_gen = np.abs(out[AdapterChoice.BASE] - out["generation_one_image"]).mean()
    assert edit_vs_gen > 3 * FP8_MEAN_BOUND and base_vs_gen > 3 * FP8_MEAN_BOUND
    # In fp8 the LoRAs do what they do in bf16: the fp8 error is small next to the adapter's effect.
    resident = outputs[MemoryMode.RESIDENT]
    delta = out[AdapterChoice.EDIT] - out[AdapterChoice.GENERATION]
    resident_delta = resident[AdapterChoice.EDIT] - resident[AdapterChoice.GENERATION]
    assert np.abs(delta - resident_delta).mean() < 0.25 * np.abs(resident_delta).mean()


def test_low_mode_stores_base_weights_in_fp8_and_keeps_the_loras_and_norms(tiny_cache):
    engine = engine_for(tiny_cache, MemoryMode.LOW, translator=False)
    transformer = engine.pipeline.transformer
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    assert dtypes["transformer_blocks.0.attn.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert dtypes["single_transformer_blocks.0.proj_mlp.weight"] == torch.float8_e4m3fn
    lora = [d for n, d in dtypes.items() if "lora_" in n]
    assert lora and all(d == torch.float32 for d in lora)  # the compute dtype on the CPU
    assert dtypes["transformer_blocks.0.norm1.linear.weight"] == torch.float32
    assert engine.placement.residency[Group.TRANSFORMER] is Residency.SWAPPED


def test_stream_mode_streams_the_transformer(tiny_cache):
    engine = engine_for(tiny_cache, MemoryMode.STREAM, translator=False)
    assert _is_group_offload_enabled(engine.pipeline.transformer)
    assert engine.describe()["groups"]["transformer"] == "streamed"


def on_device_during_each_stage(engine: Engine) -> dict[str, set[str]]:
    """Which swapped groups are on the device while each model runs."""
    seen: dict[str, set[str]] = {}
    models = {
        "translator": engine.translator.model,
        "t5": engine.pipeline.text_encoder_2,
        "clip": engine.pipeline.text_encoder,
        "transformer": engine.pipeline.transformer,
        "vae_encoder": engine.pipeline.vae.encoder,
        "vae_decoder": engine.pipeline.vae.decoder,
    }

    def hook(name):
        def record(module, args, kwargs):
            onloaded = {group.value for group, swap in engine.placement.swaps.items() if swap.onloaded}
            seen.setdefault(name, set()).update(onloaded)

        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in models.items()]
    try:
        engine.run(IMAGES, JobParameters(instruction="make it so", steps=2, seed=1))
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("mode", list(MemoryMode))
def test_each_model_visits_the_device_only_for_its_stage(tiny_cache, mode):
    engine = engine_for(tiny_cache, mode)
    spec = MODES[mode]
    assert engine.describe()["mode"] == mode.value
    swapped = {group.value for group in Group if spec.residency(group) is Residency.SWAPPED}
    assert {g.value for g in engine.placement.swaps} == swapped
    seen = on_device_during_each_stage(engine)
    expect = {
        "translator": {"translator"} & swapped,
        "t5": {"text_encoders"} & swapped,
        "clip": {"text_encoders"} & swapped,
        "transformer": {"transformer"} & swapped,
        # The VAE encodes and decodes inside the pipeline call, while the transformer is there.
        "vae_encoder": {"transformer"} & swapped,
        "vae_decoder": {"transformer"} & swapped,
    }
    assert seen == expect
    assert not any(swap.onloaded for swap in engine.placement.swaps.values())


def test_a_canceled_job_leaves_nothing_on_the_device(tiny_cache):
    engine = engine_for(tiny_cache, MemoryMode.LOW)
    steps = []
    with pytest.raises(JobCanceled):
        engine.run(
            IMAGES,
            JobParameters(instruction="x", steps=5, seed=1),
            on_progress=lambda stage, step, total: steps.append(step) if stage == "denoise" else None,
            should_cancel=lambda: len(steps) >= 2,
        )
    assert not any(swap.onloaded for swap in engine.placement.swaps.values())
    visits = engine.placement.swaps[Group.TRANSFORMER].visits
    engine.run(IMAGES[:1], JobParameters(instruction="x", steps=1, seed=1))
    assert engine.placement.swaps[Group.TRANSFORMER].visits == visits + 1


@pytest.mark.parametrize(
    ("mode", "device", "translator_device", "expected"),
    [
        (MemoryMode.LOW, "cuda", "cuda:0", Residency.SWAPPED),  # the same GPU, spelled two ways
        (MemoryMode.BALANCED, "cuda:0", "cuda", Residency.SWAPPED),
        (MemoryMode.LOW, "cuda:0", "cuda:1", Residency.RESIDENT),  # a GPU of its own
        (MemoryMode.STREAM, "cuda", "cpu", Residency.RESIDENT),
        (MemoryMode.RESIDENT, "cuda", "cuda", Residency.RESIDENT),
    ],
)
def test_the_translator_is_swapped_only_when_it_shares_the_pipelines_gpu(
    mode, device, translator_device, expected
):
    from models.placement import Placement

    assert Placement(mode, device, translator_device).translator_residency() is expected
