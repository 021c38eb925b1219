"""The memory planner: weight sizes of the published architectures, traced activations, fit checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.engine import Engine
from models.memory import (
    FIT_HEADROOM,
    GiB,
    MemoryPlanError,
    check_fit,
    layout_sizes,
    plan_memory,
    published_sizes,
    traced_peak_bytes,
)
from models.modes import MemoryMode
from models.settings import EngineSettings

ROOT = Path(__file__).resolve().parents[2]
GB = 10**9


@pytest.fixture(scope="module")
def sizes():
    return published_sizes()


def test_weights_agree_with_the_public_figures(sizes):
    # FLUX.1 Kontext [dev] 11.9B params, T5-XXL encoder 4.76B, Qwen2.5-VL-7B 8.29B, all in bf16.
    plan = plan_memory(MemoryMode.RESIDENT, 0, sizes=sizes)
    weights = {name: c.bytes / GB for name, c in plan.components.items()}
    assert weights["transformer"] == pytest.approx(23.8, abs=0.05)
    assert weights["t5_xxl"] == pytest.approx(9.5, abs=0.05)
    assert weights["translator"] == pytest.approx(16.6, abs=0.05)
    assert weights["clip_l"] == pytest.approx(0.25, abs=0.01)
    assert weights["vae"] == pytest.approx(0.17, abs=0.01)
    assert 0 < weights["edit_lora"] == weights["gen_lora"] < 1
    assert plan.lora_rank_assumed == 64


def test_fp8_storage_keeps_norms_and_modulation_in_bf16(sizes):
    plan = plan_memory(MemoryMode.LOW, 0, sizes=sizes)
    fp8 = plan.components["transformer"].bytes / GB
    # Half of 23.8 GB if every weight were fp8; the norm layers (the AdaLN modulation linears among
    # them) stay in bf16, and every stored row has an fp32 scale.
    assert 11.9 < fp8 < 16


def test_the_peak_grows_with_the_images_and_shrinks_with_the_mode(sizes):
    peaks = {mode: [plan_memory(mode, n, sizes=sizes).peak_bytes for n in (0, 2, 5)] for mode in MemoryMode}
    for values in peaks.values():
        assert values == sorted(values)
    for n in range(3):
        assert peaks[MemoryMode.RESIDENT][n] > peaks[MemoryMode.BALANCED][n] > peaks[MemoryMode.LOW][n]
    # The reference's users report 50-55 GB resident; the plan's largest resident job agrees.
    assert 48 * GB < peaks[MemoryMode.RESIDENT][2] < 56 * GB


def test_stage_totals_are_the_weights_present_plus_the_stage_activations(sizes):
    plan = plan_memory(MemoryMode.BALANCED, 2, sizes=sizes)
    c = plan.components
    resident = c["transformer"].bytes + c["edit_lora"].bytes + c["gen_lora"].bytes + c["vae"].bytes
    assert (
        plan.stages["translate"]["cuda"] == resident + c["translator"].bytes + plan.activations["translate"]
    )
    text = c["t5_xxl"].bytes + c["clip_l"].bytes
    assert plan.stages["encode_prompt"]["cuda"] == resident + text + plan.activations["encode_prompt"]
    assert plan.stages["denoise"]["cuda"] == resident + plan.activations["denoise"]
    assert plan.peak_bytes == max(s["cuda"] for s in plan.stages.values())


def test_a_translator_on_a_second_gpu_or_the_cpu(sizes):
    split = plan_memory(MemoryMode.RESIDENT, 5, sizes=sizes, translator_device="cuda:1")
    assert set(split.devices) == {"cuda", "cuda:1"}
    assert split.devices["cuda:1"] == split.components["translator"].bytes + split.activations["translate"]
    assert split.devices["cuda"] < plan_memory(MemoryMode.RESIDENT, 5, sizes=sizes).peak_bytes
    on_cpu = plan_memory(MemoryMode.BALANCED, 5, sizes=sizes, translator_device="cpu")
    assert set(on_cpu.devices) == {"cuda"}
    assert on_cpu.components["translator"].residency == "resident"
    off = plan_memory(MemoryMode.LOW, 5, sizes=sizes, translator_device=None)
    assert "translator" not in off.components and off.activations["translate"] == 0


def test_the_trace_counts_what_the_code_allocates():
    def run(model):
        a = torch.empty(1000, 1000)  # 4 MB
        b = model(a)  # another 4 MB while a is alive
        del a
        return b * 2  # 4 MB more while b is alive

    assert traced_peak_bytes(lambda: torch.nn.Identity(), run) == 8_000_000
    assert traced_peak_bytes(lambda: torch.nn.Linear(1000, 10), lambda m: m(torch.empty(1000, 1000))) == (
        4_000_000 + 40_000
    )


def test_one_block_of_each_kind_has_the_peak_of_the_whole_stack():
    # The planner traces one double and one single block: each block frees its temporaries before
    # the next starts, so the full depth has the same activation peak.
    from diffusers import FluxTransformer2DModel

    config = dict(in_channels=64, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))  # fmt: skip

    def peak(layers: int) -> int:
        def run(model):
            bf16 = torch.bfloat16  # the trace builds in bf16, as the planner's does
            return model(
                hidden_states=torch.empty(1, 300, 64, dtype=bf16),
                encoder_hidden_states=torch.empty(1, 20, 64, dtype=bf16),
                pooled_projections=torch.empty(1, 32, dtype=bf16),
                timestep=torch.ones(1, dtype=bf16),
                guidance=torch.ones(1),
                img_ids=torch.zeros(300, 3, dtype=bf16),
                txt_ids=torch.zeros(20, 3, dtype=bf16),
                return_dict=False,
            )

        return traced_peak_bytes(
            lambda: FluxTransformer2DModel(**config, num_layers=layers, num_single_layers=layers), run
        )

    assert peak(1) == peak(3) > 0


def test_check_fit_names_what_would_fit(sizes):
    balanced = plan_memory(MemoryMode.BALANCED, 5, sizes=sizes).peak_bytes
    card = {"cuda": int(balanced * (1 + FIT_HEADROOM)) + GiB // 8}
    assert check_fit(MemoryMode.BALANCED, 5, card, sizes=sizes).mode == "balanced"
    with pytest.raises(MemoryPlanError) as info:
        check_fit(MemoryMode.RESIDENT, 5, card, sizes=sizes)
    message = str(info.value)
    assert "DREAMOMNI2_MEMORY=resident does not fit" in message
    assert "DREAMOMNI2_MEMORY=balanced fits" in message
    assert "DREAMOMNI2_MEMORY_CHECK=false" in message

    with pytest.raises(MemoryPlanError) as info:
        check_fit(MemoryMode.STREAM, 5, {"cuda": 4 * GiB}, sizes=sizes)
    assert "DREAMOMNI2_TRANSLATOR_DEVICE" in str(info.value)

    # Host memory: `low` on a 24 GB card of a 32 GiB host does not fit (39 GiB pinned); on a 48 GB
    # card `balanced` pins less and fits.
    with pytest.raises(MemoryPlanError) as info:
        check_fit(MemoryMode.LOW, 5, {"cuda": 22 * GiB}, host_free=32 * GiB, sizes=sizes)
    message = str(info.value)
    assert "the host needs 39.1 GiB" in message and "32.0 GiB available" in message
    assert "No mode fits this machine" in message and "give the worker more host memory" in message
    with pytest.raises(MemoryPlanError) as info:
        check_fit(MemoryMode.LOW, 5, {"cuda": 44 * GiB}, host_free=32 * GiB, sizes=sizes)
    assert "DREAMOMNI2_MEMORY=balanced fits" in str(info.value)
    assert check_fit(MemoryMode.LOW, 5, {"cuda": 22 * GiB}, host_free=48 * GiB, sizes=sizes).mode == "low"

    low_2 = plan_memory(MemoryMode.LOW, 2, sizes=sizes).peak_bytes
    with pytest.raises(MemoryPlanError, match="low fits with DREAMOMNI2_MAX_IMAGES=2"):
        check_fit(MemoryMode.LOW, 5, {"cuda": int(low_2 * (1 + FIT_HEADROOM)) + 1}, sizes=sizes)


def test_layout_sizes_read_the_folders(tiny_root):
    sizes = layout_sizes(
        tiny_root / "kontext", tiny_root / "edit_lora", tiny_root / "gen_lora", tiny_root / "vlm-model"
    )
    assert sizes.lora_rank_assumed is None  # read from the files' headers
    plan = plan_memory(MemoryMode.RESIDENT, 2, 64, sizes=sizes)
    assert 0 < plan.peak_bytes < 200 * 2**20


def test_a_worker_that_cannot_fit_refuses_before_loading(tiny_root, tmp_path, monkeypatch):
    # The start-up check reads the GPU's free memory; on this CPU-only machine, stand in for the GPU.
    sizes = layout_sizes(
        tiny_root / "kontext", tiny_root / "edit_lora", tiny_root / "gen_lora", tiny_root / "vlm-model"
    )
    low = plan_memory(MemoryMode.LOW, 5, 64, sizes=sizes, new_tokens=32).peak_bytes
    free = int(low * (1 + FIT_HEADROOM)) + 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    settings = EngineSettings(preset="tiny", cache_dir=tiny_root.parent, device="cuda", memory="resident")
    with pytest.raises(MemoryPlanError) as info:
        Engine.from_settings(settings)
    assert "DREAMOMNI2_MEMORY=resident does not fit" in str(info.value)
    assert "fits" in str(info.value).split("does not fit", 1)[1]


def test_the_plan_command_prints_one_json_object():
    result = subprocess.run(
        [sys.executable, "-m", "models", "plan", "--memory", "low", "--images", "2", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    names = {"transformer", "edit_lora", "gen_lora", "t5_xxl", "clip_l", "vae", "translator"}
    assert set(plan["components"]) == names
    assert all(isinstance(c["bytes"], int) and c["bytes"] > 0 for c in plan["components"].values())
    assert set(plan["activations"]) == {"translate", "encode_prompt", "encode_images", "denoise", "decode"}
    assert all(isinstance(n, int) for n in plan["activations"].values())
    assert isinstance(plan["peak_bytes"], int) and plan["peak_bytes"] < 24 * GiB
    # The pinned host memory `low` needs: three groups packed in blocks, close to their weights.
    assert set(plan["host"]) == {"translator", "text_encoders", "transformer"}
    assert plan["host_bytes"] == sum(plan["host"].values())
    assert 38 * GiB < plan["host_bytes"] < 40 * GiB


def test_the_plan_command_checks_a_card(sizes, capsys):
    from models.__main__ import main

    assert main(["plan", "--memory", "low", "--images", "5", "--card", "24", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is True and plan["max_images"] >= 5
    assert main(["plan", "--memory", "resident", "--images", "5", "--card", "40"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "--images", "-1"]) == 2
    assert main(["plan", "--batch", "0"]) == 2
    assert main(["plan", "--memory", "resident", "--images", "2", "--card", "80", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_batch"] >= 4  # 80 GiB: four outputs of a 2-image edit
    assert main(["plan", "--memory", "resident", "--images", "2", "--batch", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"] == 4


def test_the_start_up_check_samples_as_many_images_together_as_fit(sizes, tiny_root, monkeypatch):
    # The check on a stand-in GPU, planning the published models (at the tiny sizes the text encoders'
    # peak hides the batch's).
    import models.memory
    from models.layout import check_memory, resolve_layout

    monkeypatch.setenv("DREAMOMNI2_MAX_NUM_IMAGES", "4")
    monkeypatch.setattr(models.memory, "layout_sizes", lambda *args, **kwargs: sizes)
    plans = [plan_memory(MemoryMode.RESIDENT, 5, sizes=sizes, new_tokens=32, batch=b) for b in (1, 2, 3, 4)]
    assert [p.batch for p in plans] == [1, 2, 3, 4]
    assert plans[0].peak_bytes < plans[1].peak_bytes < plans[2].peak_bytes < plans[3].peak_bytes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def check(free: int, batch: str = "auto"):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
        settings = EngineSettings(
            preset="tiny", cache_dir=tiny_root.parent, device="cuda", batch_images=batch
        )
        return check_memory(settings, resolve_layout(settings), "cuda", "cuda")

    room_for = [int(p.peak_bytes * (1 + FIT_HEADROOM)) + 1 for p in plans]
    assert check(room_for[0]).batch == 1
    found = check(room_for[2])
    assert found.batch == 3 and found.plan.batch == 3 and found.plan.peak_bytes == plans[2].peak_bytes
    assert check(2 * room_for[3]).batch == 4  # never past DREAMOMNI2_MAX_NUM_IMAGES
    assert check(2 * room_for[3], "9").batch == 4
    assert check(room_for[1], "2").batch == 2
    with pytest.raises(MemoryPlanError) as info:
        check(room_for[1], "3")  # a batch the operator set must fit
    message = str(info.value)
    assert "3 output images sampled together" in message and "DREAMOMNI2_BATCH_IMAGES" in message


def test_the_plan_counts_the_registered_loras_where_the_worker_keeps_them(tiny_root, tiny_loras):
    # Against what the code really keeps: the loaded LoRAs' sizes, and a compiled profile's pristine
    # copies (`FusedAdapters`) of the weights the DreamOmni2 LoRAs and the registered ones adapt.
    from models.adapters import AdapterSet
    from models.memory.user_loras import registered_lora_sizes
    from models.pipeline import DreamOmni2Pipeline
    from models.speed import FusedAdapters
    from models.user_loras import load_user_loras

    cap = 5_000
    settings = EngineSettings(
        preset="tiny", cache_dir=tiny_root.parent, device="cpu", translator=False, lora_cache_bytes=cap,
        limits={"loras": json.dumps(tiny_loras), "max_loras_per_job": 2},
    )  # fmt: skip
    sizes = layout_sizes(
        tiny_root / "kontext", tiny_root / "edit_lora", tiny_root / "gen_lora", tiny_root / "vlm-model",
        dtype=torch.float32,
    )  # fmt: skip
    planned = registered_lora_sizes(settings, torch.float32, sizes.lora_targets)
    pipe = DreamOmni2Pipeline.from_pretrained(tiny_root / "kontext")
    user = load_user_loras(settings, pipe)
    loaded = sorted(user.sizes.values(), reverse=True)
    assert planned.device_bytes == sum(loaded[:2])
    assert planned.cache_bytes == min(sum(loaded), cap + sum(loaded[:2])) == cap + sum(loaded[:2])
    # ff.net.0.proj and the single block's proj_out: adapted by registered LoRAs only.
    assert len(planned.lora_only_weight_bytes) == 2
    adapters = AdapterSet.load(
        pipe, edit=tiny_root / "edit_lora", generation=tiny_root / "gen_lora", user=user
    )
    fused = FusedAdapters.from_peft(pipe, adapters.names, user=user)
    kept = fused.pristine_bytes
    assert kept == sum(sizes.adapted_weight_bytes) + sum(planned.lora_only_weight_bytes)
    assert fused.host is not None and fused.host.layout.nbytes >= kept

    reference = plan_memory(MemoryMode.RESIDENT, 1, 64, sizes=sizes, user_loras=planned, include_cpu=True)
    compiled = plan_memory(
        MemoryMode.RESIDENT, 1, 64, sizes=sizes, user_loras=planned, include_cpu=True, speed="compiled"
    )
    plain = plan_memory(MemoryMode.RESIDENT, 1, 64, sizes=sizes, include_cpu=True, speed="compiled")
    assert reference.components["user_loras"].bytes == planned.device_bytes
    assert reference.host == {"user_lora_cache": planned.cache_bytes}
    assert compiled.host["pristine_adapted_weights"] == fused.host.layout.nbytes
    assert compiled.host["pristine_adapted_weights"] > plain.host["pristine_adapted_weights"]
    assert "user_loras" not in plain.components and "user_lora_cache" not in plain.host
