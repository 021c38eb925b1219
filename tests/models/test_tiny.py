"""The tiny preset: loads with the stock loaders, runs, is deterministic, has two effective LoRAs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FluxKontextPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from models import tiny
from models.adapters import LORA_WEIGHT_NAME
from models.tiny import LORA_ALPHA, TINY_DIRNAME, ensure_tiny

EXPECTED_FILES = [
    "kontext/model_index.json",
    "kontext/scheduler/scheduler_config.json",
    "kontext/transformer/diffusion_pytorch_model.safetensors",
    "kontext/vae/diffusion_pytorch_model.safetensors",
    "kontext/text_encoder/model.safetensors",
    "kontext/text_encoder_2/model.safetensors",
    "kontext/tokenizer/tokenizer.json",
    "kontext/tokenizer_2/tokenizer.json",
    f"edit_lora/{LORA_WEIGHT_NAME}",
    f"gen_lora/{LORA_WEIGHT_NAME}",
    "vlm-model/config.json",
    "vlm-model/generation_config.json",
    "vlm-model/model.safetensors",
    "vlm-model/tokenizer.json",
    "vlm-model/tokenizer_config.json",
    "vlm-model/preprocessor_config.json",
    "vlm-model/chat_template.json",
]


class KontextSubclass(FluxKontextPipeline):
    """Stands for our own pipeline class: the folder must load into subclasses too."""


def noise_image(size: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def run_64(pipe: FluxKontextPipeline, steps: int = 2) -> np.ndarray:
    image = pipe(
        image=noise_image(64, seed=0),
        prompt="make the cat blue",
        height=64,
        width=64,
        max_area=64 * 64,
        _auto_resize=False,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images[0]
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module")
def kontext(tiny_root: Path) -> FluxKontextPipeline:
    pipe = FluxKontextPipeline.from_pretrained(tiny_root / "kontext")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_layout_and_size(tiny_root: Path) -> None:
    assert tiny_root.name == TINY_DIRNAME
    for name in EXPECTED_FILES:
        assert (tiny_root / name).is_file(), name
    total = sum(f.stat().st_size for f in tiny_root.rglob("*") if f.is_file())
    assert total < 4 * 1024 * 1024


def test_kontext_folder_loads_and_runs(kontext: FluxKontextPipeline) -> None:
    assert not kontext.transformer.training and not kontext.text_encoder_2.training
    scheduler = kontext.scheduler.config
    assert scheduler.use_dynamic_shifting and scheduler.shift == 3.0
    assert (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)
    assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len) == (256, 4096)
    assert kontext.vae_scale_factor == 8
    assert kontext.tokenizer.model_max_length == 77

    out = run_64(kontext)
    assert out.shape == (64, 64, 3)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, run_64(kontext))


def test_kontext_folder_loads_into_a_subclass(tiny_root: Path) -> None:
    pipe = KontextSubclass.from_pretrained(tiny_root / "kontext")
    assert isinstance(pipe, KontextSubclass)


def test_loras_load_under_names_and_change_the_output(kontext: FluxKontextPipeline, tiny_root: Path) -> None:
    base = run_64(kontext, steps=4)
    kontext.load_lora_weights(tiny_root / "edit_lora", adapter_name="edit")
    kontext.load_lora_weights(tiny_root / "gen_lora", adapter_name="gen")
    try:
        # lora_alpha (deliberately != rank) came back from the saved adapter metadata.
        assert kontext.transformer.peft_config["edit"].lora_alpha == LORA_ALPHA
        assert kontext.transformer.peft_config["gen"].lora_alpha == LORA_ALPHA

        kontext.set_adapters(["edit"], adapter_weights=[1.0])
        edit = run_64(kontext, steps=4)
        kontext.set_adapters(["gen"], adapter_weights=[1.0])
        gen = run_64(kontext, steps=4)
        kontext.disable_lora()
        disabled = run_64(kontext, steps=4)
    finally:
        kontext.unload_lora_weights()

    np.testing.assert_array_equal(disabled, base)
    # Visibly different: several levels out of 255 on average, not rounding noise.
    assert np.abs(edit - base).mean() > 3 / 255
    assert np.abs(gen - base).mean() > 3 / 255
    assert np.abs(edit - gen).mean() > 3 / 255


def test_the_two_loras_are_different_random_adapters(tiny_root: Path) -> None:
    edit = load_file(tiny_root / "edit_lora" / LORA_WEIGHT_NAME)
    gen = load_file(tiny_root / "gen_lora" / LORA_WEIGHT_NAME)
    assert edit.keys() == gen.keys()
    assert all(key.startswith("transformer.") for key in edit)
    lora_b = [key for key in edit if "lora_B" in key]
    # Attention projections of both block kinds, and lora_B is not peft's all-zero start.
    assert any("single_transformer_blocks" in key for key in lora_b)
    assert any("add_q_proj" in key for key in lora_b) and any("to_add_out" in key for key in lora_b)
    assert all(edit[key].abs().max() > 0 for key in lora_b)
    assert not torch.equal(edit[lora_b[0]], gen[lora_b[0]])


def safetensors_metadata(path: Path) -> dict[str, object]:
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    return {
        key: json.loads(value) if key == "lora_adapter_metadata" else value for key, value in metadata.items()
    }


def assert_same_safetensors(a: Path, b: Path) -> None:
    # The safetensors writer orders the header's metadata entries at random (a Rust hash map), so the
    # LoRA files can differ in bytes; their tensors and metadata must not.
    tensors_a, tensors_b = load_file(a), load_file(b)
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), (a, key)
    assert safetensors_metadata(a) == safetensors_metadata(b)


def test_cli_build_is_identical_to_the_cached_one(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny.main([str(tmp_path)])
    printed = capsys.readouterr().out
    for name in ("kontext", "edit_lora", "gen_lora", "vlm-model"):
        assert str(tmp_path / name) in printed

    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    cached = sorted(p.relative_to(tiny_root) for p in tiny_root.rglob("*") if p.is_file())
    assert built == cached
    for rel in built:
        if rel.suffix == ".safetensors":
            assert_same_safetensors(tmp_path / rel, tiny_root / rel)
        else:
            assert (tmp_path / rel).read_bytes() == (tiny_root / rel).read_bytes(), rel


def test_ensure_tiny_reuses_a_finished_folder(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_build(out: Path) -> None:
        raise AssertionError("rebuilt an existing tiny folder")

    monkeypatch.setattr(tiny, "build_tiny", must_not_build)
    assert ensure_tiny(tiny_root.parent) == tiny_root


def fake_build(out: Path) -> None:
    (out / "kontext").mkdir()
    (out / "kontext" / "model_index.json").write_text("{}")


def leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.name != TINY_DIRNAME]


def test_ensure_tiny_keeps_the_winners_folder_when_it_loses_the_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / TINY_DIRNAME

    def slow_build(out: Path) -> None:
        # Another process finishes and renames its build while this one is still building.
        target.mkdir()
        (target / "winner").write_text("theirs")
        fake_build(out)

    monkeypatch.setattr(tiny, "build_tiny", slow_build)
    assert ensure_tiny(tmp_path) == target
    assert (target / "winner").read_text() == "theirs"
    assert not (target / "kontext").exists()
    assert leftovers(tmp_path) == []


def test_ensure_tiny_concurrent_callers_share_one_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    barrier = threading.Barrier(3)

    def racing_build(out: Path) -> None:
        fake_build(out)
        (out / "builder").write_text(threading.current_thread().name)
        barrier.wait(timeout=10)  # every caller has built before any renames

    monkeypatch.setattr(tiny, "build_tiny", racing_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_tiny(tmp_path)), name=f"t{i}") for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert results == [tmp_path / TINY_DIRNAME] * 3
    assert (tmp_path / TINY_DIRNAME / "builder").read_text() in {"t0", "t1", "t2"}
    assert leftovers(tmp_path) == []


def test_ensure_tiny_cleans_up_after_a_failed_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_build(out: Path) -> None:
        fake_build(out)
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build_tiny", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_tiny(tmp_path)
    assert list(tmp_path.iterdir()) == []
