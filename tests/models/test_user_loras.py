"""Registered LoRAs on the tiny weights (reference profile): every layout, refusals at start naming the
file, stacking, scale 0, exactness after random sequences of jobs, and the bounded host cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from api_schemas.common import AdapterChoice, Task
from api_schemas.jobs import JobParameters
from api_schemas.loras import AppliedLora
from models.adapters import AdapterSet
from models.engine import Engine
from models.pipeline import DreamOmni2Pipeline
from models.settings import EngineSettings
from models.tiny_loras import lora_state, save_tiny_lora
from models.user_loras import LoraFileError, UserLoras

IMAGES = [
    PIL.Image.fromarray(np.random.default_rng(n).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for n in range(3)
]


def settings(tiny_cache: Path, registry: dict, **values: object) -> EngineSettings:
    limits = {"loras": json.dumps(registry), **values.pop("limits", {})}
    return EngineSettings(
        preset="tiny", cache_dir=tiny_cache, device="cpu", translator=False, limits=limits, **values
    )


def run(engine: Engine, count: int, task: Task, loras: list | None = None, seed: int = 5) -> np.ndarray:
    job = JobParameters(instruction="x", task=task, steps=2, seed=seed, translate=False, loras=loras)
    result = engine.run(IMAGES[:count], job)
    assert [(lora.name, lora.scale) for lora in result.metadata.loras] == [
        (c["name"], c.get("scale", engine.limits.loras[c["name"]].scale)) for c in loras or []
    ]
    return np.asarray(result.image)


@pytest.fixture(scope="module")
def engine(tiny_cache, tiny_loras) -> Engine:
    return Engine.from_settings(settings(tiny_cache, tiny_loras))


#: Jobs of every adapter the rule picks, with none, one and two stacked LoRAs, scale 0 included.
CASES = [
    (1, Task.EDIT, None),
    (2, Task.EDIT, [{"name": "style"}]),
    (2, Task.GENERATE, [{"name": "comfy", "scale": 1.5}]),
    (1, Task.EDIT, [{"name": "kohya"}, {"name": "style", "scale": -0.7}]),
    (2, Task.EDIT, None),
    (0, Task.GENERATE, [{"name": "style", "scale": 0.4}, {"name": "comfy"}]),
    (2, Task.EDIT, [{"name": "kohya", "scale": 0}]),
]


def test_loras_change_the_image_and_scale_0_is_no_lora(engine):
    plain = run(engine, 2, Task.EDIT)
    styled = run(engine, 2, Task.EDIT, [{"name": "style"}])
    assert np.abs(styled.astype(float) - plain).mean() > 1
    assert np.array_equal(run(engine, 2, Task.EDIT, [{"name": "style", "scale": 0}]), plain)
    stacked = run(engine, 2, Task.EDIT, [{"name": "style"}, {"name": "kohya"}])
    assert np.abs(stacked.astype(float) - styled).mean() > 1


def test_random_sequences_are_bit_identical_to_a_fresh_worker(tiny_cache, tiny_loras, engine):
    expected = {}
    for n, (count, task, loras) in enumerate(CASES):
        fresh = Engine.from_settings(settings(tiny_cache, tiny_loras))
        expected[n] = run(fresh, count, task, loras)
    order = [n for n in range(len(CASES)) for _ in range(4)]
    random.Random(22).shuffle(order)
    for n in order:  # 28 jobs, each case after all kinds of others
        count, task, loras = CASES[n]
        assert np.array_equal(run(engine, count, task, loras), expected[n]), (n, CASES[n])


def test_the_side_path_is_peft_itself(tiny_root, tiny_cache):
    # The DreamOmni2 edit LoRA registered as a user LoRA, stacked on plain Kontext, is bit for bit the
    # edit adapter as peft runs it: the same file, the same scale (lora_alpha / r from its metadata).
    registry = {"edit-again": {"path": str(tiny_root / "edit_lora")}}
    pipe = DreamOmni2Pipeline.from_pretrained(tiny_root / "kontext")
    pipe.set_progress_bar_config(disable=True)
    user = UserLoras.load(
        registry_of(registry), pipe.transformer, max_rank=8, cache_bytes=2**20, dtype=torch.float32
    )
    adapters = AdapterSet.load(
        pipe, edit=tiny_root / "edit_lora", generation=tiny_root / "gen_lora", user=user
    )

    def sample() -> np.ndarray:
        return pipe(
            images=IMAGES[:2], prompt="x", num_inference_steps=2, max_area=64 * 64, resolution_buckets=None,
            generator=torch.Generator().manual_seed(3), output_type="np",
        ).images  # fmt: skip

    adapters.activate(AdapterChoice.EDIT)
    by_peft = sample()
    adapters.activate(AdapterChoice.BASE, [AppliedLora(name="edit-again", scale=1.0)])
    assert np.array_equal(sample(), by_peft)
    adapters.activate(AdapterChoice.BASE)
    assert not np.array_equal(sample(), by_peft)


def registry_of(entries: dict) -> dict:
    from api_schemas.jobs import JobLimits

    return JobLimits(loras=json.dumps(entries)).loras


def test_the_cache_drops_the_least_recently_used_and_reloads_them_exactly(tiny_cache, tiny_loras, engine):
    # Room for about one LoRA: every switch reloads from the file, with the same images.
    small = Engine.from_settings(settings(tiny_cache, tiny_loras, lora_cache_bytes=30_000))
    cache = small.adapters.user.cache
    for count, task, loras in CASES[1:4]:
        assert np.array_equal(run(small, count, task, loras), run(engine, count, task, loras))
    assert cache.evictions > 0 and cache.loads > 0 and len(cache._entries) <= 2
    assert small.describe()["loras"]["registered"] == ["comfy", "kohya", "style"]


def test_a_job_naming_a_lora_the_worker_lacks_fails_cleanly(engine):
    from api_schemas.errors import ErrorCode, InvalidInput
    from api_schemas.jobs import ResolvedJob

    job = engine.check(JobParameters(instruction="x", steps=1, seed=1, translate=False), 1)
    foreign = ResolvedJob.model_validate({**job.model_dump(), "loras": [{"name": "other", "scale": 1.0}]})
    with pytest.raises(InvalidInput) as raised:
        engine.run(IMAGES[:1], foreign)
    assert raised.value.code is ErrorCode.UNKNOWN_LORA
    run(engine, 1, Task.EDIT, [{"name": "style"}])  # the next job runs


def bad_files(folder: Path) -> dict[str, tuple[dict, str]]:
    """name -> (registry entry, what the refusal says), one per way a file can be wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (folder / "pickle.bin").write_bytes(b"\x80\x04K\x01.")
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}  # fmt: skip
    save_file(sdxl, str(folder / "sdxl.safetensors"))
    wide = {k.replace(".lora_B.", ".lora_B."): torch.zeros(3072, v.shape[1]) if ".lora_B." in k else v
            for k, v in lora_state("peft")[0].items()}  # fmt: skip
    save_file(wide, str(folder / "wide.safetensors"), metadata=lora_state("peft")[1])
    te = dict(lora_state("kohya")[0])
    te["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 32)
    te["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(64, 4)
    save_file(te, str(folder / "te.safetensors"))
    (folder / "two").mkdir(exist_ok=True)
    for n in (1, 2):
        save_tiny_lora(folder / "two" / f"{n}.safetensors")
    return {
        "garbage": ({"path": str(folder / "garbage.safetensors")}, "not a readable safetensors file"),
        "pickle": ({"path": str(folder / "pickle.bin")}, "not a .safetensors file"),
        "sdxl": ({"path": str(folder / "sdxl.safetensors")}, "not a FLUX LoRA diffusers can read"),
        "wide": ({"path": str(folder / "wide.safetensors")}, "wrong shapes"),
        "te": ({"path": str(folder / "te.safetensors")}, "adapts the text encoder"),
        "ranked": ({"path": str(save_tiny_lora(folder / "r16.safetensors", rank=16))}, "rank 16 at"),
        "missing": ({"path": str(folder / "nowhere.safetensors")}, "neither a file nor a folder"),
        "two": ({"path": str(folder / "two")}, "holds 2 .safetensors files"),
    }


@pytest.mark.parametrize("name", ["garbage", "pickle", "sdxl", "wide", "te", "ranked", "missing", "two"])
def test_a_bad_file_stops_the_start_naming_it(tiny_cache, tiny_loras, tmp_path_factory, name):
    entry, problem = bad_files(tmp_path_factory.mktemp("bad"))[name]
    registry = {**tiny_loras, name: entry}
    with pytest.raises(LoraFileError, match=problem) as raised:
        Engine.from_settings(settings(tiny_cache, registry, limits={"max_lora_rank": 8}))
    assert f"LoRA {name!r}" in str(raised.value)
    assert Path(entry["path"]).name in str(raised.value)


def test_a_folder_with_weight_name_and_a_hub_id_from_the_cache(tiny_cache, tmp_path, monkeypatch):
    # A Hub id resolves at start through the Hub cache (offline here, as on every test host).
    snapshot = tmp_path / "hub" / "models--team--extraction" / "snapshots" / ("0" * 40)
    save_tiny_lora(snapshot / "extraction.safetensors", "kohya", seed=7)
    save_tiny_lora(snapshot / "other.safetensors", seed=8)
    (tmp_path / "hub" / "models--team--extraction" / "refs").mkdir()
    (tmp_path / "hub" / "models--team--extraction" / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    registry = {
        "hub": {"path": "team/extraction", "weight_name": "extraction.safetensors"},
        "folder": {"path": str(snapshot), "weight_name": "other.safetensors"},
    }
    engine = Engine.from_settings(settings(tiny_cache, registry))
    assert engine.adapters.user.files["hub"].name == "extraction.safetensors"
    run(engine, 2, Task.EDIT, [{"name": "hub"}, {"name": "folder"}])


def test_a_lora_file_changed_or_removed_after_start_fails_its_job_and_the_worker_goes_on(
    tiny_cache, tmp_path, engine
):
    from api_schemas.errors import ErrorCode, LoraUnavailable

    registry = {
        "kept": {"path": str(save_tiny_lora(tmp_path / "kept.safetensors", "peft", seed=1, rank=4))},
        "changed": {"path": str(save_tiny_lora(tmp_path / "changed.safetensors", "peft", seed=2, rank=4))},
        "removed": {"path": str(save_tiny_lora(tmp_path / "removed.safetensors", "kohya", seed=3, rank=2))},
    }
    worker = Engine.from_settings(settings(tiny_cache, registry))
    before = run(worker, 1, Task.EDIT, [{"name": "kept"}])
    save_tiny_lora(tmp_path / "changed.safetensors", "peft", seed=9, rank=4)  # still cached: refused too
    (tmp_path / "removed.safetensors").unlink()
    for name, problem in (("changed", "changed"), ("removed", "is missing")):
        with pytest.raises(LoraUnavailable) as raised:
            run(worker, 1, Task.EDIT, [{"name": "kept"}, {"name": name}])
        assert raised.value.code is ErrorCode.LORA_UNAVAILABLE
        assert f"The file of LoRA {name!r} {problem}" in raised.value.message
    # The worker goes on: the same images as before the refusals, with and without LoRAs.
    assert np.array_equal(run(worker, 1, Task.EDIT, [{"name": "kept"}]), before)
    assert np.array_equal(run(worker, 1, Task.EDIT), run(engine, 1, Task.EDIT))
