"""The instruction translator: messages, answer parsing, fallback, and the tiny VLM end to end."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from api_schemas import Task
from models.tiny import TINY_VLM_MAX_PIXELS, TINY_VLM_MIN_PIXELS
from models.translator import (
    DEFAULT_MAX_NEW_TOKENS,
    QWEN2_VL_CHAT_TEMPLATE,
    InstructionTranslator,
    Qwen2_5_VLImageTextProcessor,
    Translation,
    build_translation_messages,
    parse_translation,
    translation_from_raw,
)

BUDGET = 16


def noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def vlm_dir(tiny_root: Path) -> Path:
    return tiny_root / "vlm-model"


@pytest.fixture(scope="module")
def translator(vlm_dir: Path) -> InstructionTranslator:
    return InstructionTranslator.from_pretrained(vlm_dir, device="cpu", max_new_tokens=BUDGET)


# --- messages -------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 3])
@pytest.mark.parametrize(
    ("task", "suffix"), [(Task.EDIT, " It is editing task."), (Task.GENERATE, " It is generation task.")]
)
def test_messages_hold_every_image_in_order_then_the_text(count: int, task: Task, suffix: str) -> None:
    images = [noise_image(32, 32, seed) for seed in range(count)]
    messages = build_translation_messages(images, "Put the hat of image 2 on the dog.", task)

    assert len(messages) == 1 and messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert [item["type"] for item in content] == ["image"] * count + ["text"]
    assert all(item["image"] is image for item, image in zip(content, images, strict=False))
    assert content[-1]["text"] == "Put the hat of image 2 on the dog." + suffix


def test_messages_accept_the_task_as_its_string_value() -> None:
    messages = build_translation_messages([], "A cat.", "generate")  # type: ignore[arg-type]
    assert messages[0]["content"][-1]["text"] == "A cat. It is generation task."


def test_rendered_chat_is_the_default_qwen_template(translator: InstructionTranslator) -> None:
    images = [noise_image(32, 32, 0), noise_image(32, 32, 1)]
    messages = build_translation_messages(images, "Make it blue.", Task.EDIT)
    text = translator.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{vision}{vision}Make it blue. It is editing task.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# --- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<gen>\nA red car on a beach.\n</gen>", "A red car on a beach."),
        ("<edit>Replace the hat with the one in image 2.</edit>", "Replace the hat with the one in image 2."),
        ("  \n<gen>  spaced out  </gen>\n\n", "spaced out"),
        ("<prompt>two\nlines</prompt>", "two\nlines"),
        ("<Gen_2>mixed-case tag</Gen_2>", "mixed-case tag"),
        ("<gen>a < b and c > d</gen>", "a < b and c > d"),
        ("<gen>keeps <|special|> looking text</gen>", "keeps <|special|> looking text"),
    ],
)
def test_parse_accepts_a_tagged_prompt(raw: str, expected: str) -> None:
    assert parse_translation(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   \n ",
        "A red car on a beach.",  # no tags
        "<gen>\nA red car on a beach, driving toward",  # cut off by the token budget
        "<gen>A red car.</edit>",  # mismatched
        "<gen>A red car.</GEN>",  # the close tag must repeat the name exactly
        "<gen></gen>",  # empty
        "<gen> \n </gen>",  # blank
        "<gen>A red car.</gen><gen>A blue car.</gen>",  # two answers
        "<gen><edit>nested</edit></gen>",  # tags left inside
        "<gen>A red car.</gen> and more",  # trailing junk
        "Sure! <gen>A red car.</gen>",  # leading junk
        "<averyveryverylongtagname>x</averyveryverylongtagname>",  # not a short tag
        "<1>x</1>",  # not a word
        "gen>A red car.</gen",  # broken brackets
    ],
)
def test_parse_rejects_what_does_not_look_right(raw: str) -> None:
    assert parse_translation(raw) is None


def test_translation_from_a_good_answer() -> None:
    result = translation_from_raw(
        "<gen>\nA cat.\n</gen>", "make a cat", duration_s=0.5, generated_tokens=9, max_new_tokens=BUDGET
    )
    assert result == Translation(
        prompt="A cat.",
        translated=True,
        raw="<gen>\nA cat.\n</gen>",
        fallback_reason=None,
        duration_s=0.5,
        generated_tokens=9,
    )


@pytest.mark.parametrize(
    ("raw", "tokens", "reason"),
    [
        ("", 1, "empty"),
        ("<edit> </edit>", 5, "empty"),
        ("<gen>\nA cat sitting on", BUDGET, "truncated"),
        ("<gen>\nA cat sitting on", 7, "unparseable"),
        ("A cat.", 3, "unparseable"),
    ],
)
def test_translation_falls_back_to_the_instruction(raw: str, tokens: int, reason: str) -> None:
    result = translation_from_raw(raw, "make a cat", generated_tokens=tokens, max_new_tokens=BUDGET)
    assert (result.prompt, result.translated, result.raw) == ("make a cat", False, raw)
    assert result.fallback_reason == reason


# --- the tiny VLM end to end ----------------------------------------------------------------------


def test_tiny_vlm_runs_within_the_budget_and_falls_back(translator: InstructionTranslator) -> None:
    images = [noise_image(64, 64, 0), noise_image(96, 48, 1)]
    result = translator.translate(images, "Make the cat wear the hat from image 2.", Task.EDIT)

    assert 1 <= result.generated_tokens <= BUDGET
    # A random VLM never answers in the tagged format: the instruction is used, the raw answer kept.
    assert result.translated is False
    assert result.prompt == "Make the cat wear the hat from image 2."
    assert result.fallback_reason in {"empty", "unparseable", "truncated"}
    assert result.duration_s > 0
    raw, tokens = translator.generate_raw(images, "Make the cat wear the hat from image 2.", Task.EDIT)
    assert (raw, tokens) == (result.raw, result.generated_tokens)  # greedy: deterministic


def test_tiny_vlm_handles_no_image_and_odd_image_modes(translator: InstructionTranslator) -> None:
    assert translator.translate([], "A cat.", Task.GENERATE).generated_tokens <= BUDGET
    images = [noise_image(40, 40, 2, mode="RGBA"), noise_image(40, 40, 3, mode="L")]
    assert translator.translate(images, "A cat.", Task.GENERATE).generated_tokens <= BUDGET


def test_a_tagged_answer_is_used(translator: InstructionTranslator, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_generate_raw(images: list[PIL.Image.Image], instruction: str, task: Task) -> tuple[str, int]:
        seen.update(images=images, instruction=instruction, task=task)
        return "<edit>\nThe cat wears the red hat of image 2.\n</edit>", 12

    monkeypatch.setattr(translator, "generate_raw", fake_generate_raw)
    images = [noise_image(32, 32, 0)]
    result = translator.translate(images, "put the hat on the cat", Task.EDIT)

    assert seen == {"images": images, "instruction": "put the hat on the cat", "task": Task.EDIT}
    assert result.translated is True
    assert result.prompt == "The cat wears the red hat of image 2."
    assert result.fallback_reason is None and result.generated_tokens == 12


def test_model_errors_propagate(translator: InstructionTranslator, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(**kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(translator.model, "generate", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        translator.translate([noise_image(32, 32, 0)], "A cat.", Task.GENERATE)


def test_settings(vlm_dir: Path, translator: InstructionTranslator) -> None:
    assert translator.device == torch.device("cpu")
    assert not translator.model.training
    assert translator.max_new_tokens == BUDGET
    # A useful prompt runs to T5's 512 tokens; the default must not cut a real answer short.
    assert DEFAULT_MAX_NEW_TOKENS >= 600
    assert (
        InstructionTranslator(translator.model, translator.processor).max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    )
    with pytest.raises(ValueError, match="max_new_tokens"):
        InstructionTranslator(translator.model, translator.processor, max_new_tokens=0)


def test_the_folders_pixel_bounds_set_the_vision_tokens(translator: InstructionTranslator) -> None:
    # As the reference: the processor resizes within its own folder's min/max pixels, nothing else.
    assert translator.processor.image_processor.size == {
        "shortest_edge": TINY_VLM_MIN_PIXELS,
        "longest_edge": TINY_VLM_MAX_PIXELS,
    }
    big, small = noise_image(200, 200, 0), noise_image(20, 20, 1)
    grid = translator.prepare_inputs([big, small], "A cat.", Task.GENERATE)["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8], [1, 4, 4]]  # 112 x 112 at most, 56 x 56 at least


def test_bfloat16_load(vlm_dir: Path) -> None:
    translator = InstructionTranslator.from_pretrained(vlm_dir, dtype=torch.bfloat16, max_new_tokens=4)
    assert translator.model.dtype == torch.bfloat16
    assert translator.translate([noise_image(32, 32, 0)], "A cat.", Task.GENERATE).generated_tokens <= 4


# --- processor folder layouts ---------------------------------------------------------------------


def test_processor_is_torchvision_free(vlm_dir: Path) -> None:
    processor = Qwen2_5_VLImageTextProcessor.from_pretrained(vlm_dir)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert not hasattr(processor, "video_processor")
    assert processor.get_attributes() == ["image_processor", "tokenizer"]


def copy_vlm(vlm_dir: Path, dest: Path) -> Path:
    shutil.copytree(vlm_dir, dest)
    return dest


def chat_text(processor: Qwen2_5_VLImageTextProcessor) -> str:
    messages = build_translation_messages([noise_image(32, 32, 0)], "A cat.", Task.GENERATE)
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_layout_with_the_template_only_in_tokenizer_config(vlm_dir: Path, tmp_path: Path) -> None:
    # Qwen's own folders: chat template inside tokenizer_config.json, plus a video processor config
    # that we must ignore.
    folder = copy_vlm(vlm_dir, tmp_path / "vlm")
    (folder / "chat_template.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN2_VL_CHAT_TEMPLATE.replace("helpful assistant", "tokenizer-level assistant")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "video_preprocessor_config.json").write_text(
        json.dumps({"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2})
    )

    processor = Qwen2_5_VLImageTextProcessor.from_pretrained(folder)
    assert "tokenizer-level assistant" in chat_text(processor)
    assert processor.image_processor.size["longest_edge"] == TINY_VLM_MAX_PIXELS


def test_layout_saved_by_transformers_5(vlm_dir: Path, tmp_path: Path) -> None:
    # What `save_pretrained` writes today: processor_config.json with nested sub-configs (the stock
    # processor adds a video processor entry) and chat_template.jinja.
    processor = Qwen2_5_VLImageTextProcessor.from_pretrained(vlm_dir)
    folder = tmp_path / "vlm"
    processor.save_pretrained(folder)
    assert (folder / "processor_config.json").is_file() and (folder / "chat_template.jinja").is_file()
    config = json.loads((folder / "processor_config.json").read_text())
    config["processor_class"] = "Qwen2_5_VLProcessor"
    config["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14}
    (folder / "processor_config.json").write_text(json.dumps(config))

    reloaded = Qwen2_5_VLImageTextProcessor.from_pretrained(folder)
    assert chat_text(reloaded) == chat_text(processor)
    assert reloaded.image_processor.size == processor.image_processor.size


def test_layout_without_any_template_uses_the_default(
    vlm_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = copy_vlm(vlm_dir, tmp_path / "vlm")
    (folder / "chat_template.json").unlink()
    with caplog.at_level(logging.WARNING, logger="models.translator"):
        processor = Qwen2_5_VLImageTextProcessor.from_pretrained(folder)
    assert processor.chat_template == QWEN2_VL_CHAT_TEMPLATE
    assert "default Qwen2.5-VL template" in caplog.text
