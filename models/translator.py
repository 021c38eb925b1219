"""The instruction translator: DreamOmni2's Qwen2.5-VL turns a colloquial instruction into the LoRAs' prompt.

As the reference runs it: one user turn holding every input image in order and then the instruction
with a task suffix, the model's default chat template, greedy decoding. The answer wraps the prompt
in a short tag pair (`<gen>...</gen>`, `<edit>...</edit>`); the reference strips 6 leading and 7
trailing characters blindly, this module parses the tags and falls back to the user's own
instruction when the answer does not look right.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    BaseImageProcessor,
    BatchFeature,
    PreTrainedTokenizerBase,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)

from api_schemas import Task
from api_schemas.images import normalize_image
from models.settings import DEFAULT_TRANSLATOR_MAX_NEW_TOKENS

logger = logging.getLogger(__name__)

# The default chat template of Qwen2-VL / Qwen2.5-VL (their chat_template.json). A tokenizer built
# locally ships none, and a fine-tune folder may keep it only in tokenizer_config.json.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TASK_SUFFIXES: dict[Task, str] = {
    Task.EDIT: " It is editing task.",
    Task.GENERATE: " It is generation task.",
}

DEFAULT_MAX_NEW_TOKENS = DEFAULT_TRANSLATOR_MAX_NEW_TOKENS

# `<tag>content</tag>`: a short word as tag name, the same name closing it, nothing around but space.
_TAGGED = re.compile(r"<([A-Za-z][A-Za-z0-9_-]{0,15})>(.*)</\1>", re.DOTALL)
_ANY_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9_-]{0,15}>")


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor, so it loads and runs without torchvision.

    transformers builds a processor's parts from its `__init__` parameters; the stock class asks for a
    video processor, which needs torchvision, and we run without it (PyPI's torchvision breaks
    `import diffusers` on our CPU torch). Declaring only the image processor and the tokenizer keeps
    everything the translator needs; without torchvision the image processor is the PIL one.
    Loads the published `vlm-model/` layout (preprocessor_config.json, chat_template.json) as well as
    what transformers 5 saves (processor_config.json, chat_template.jinja). When the folder holds no
    processor-level chat template, the tokenizer's is used, then Qwen2.5-VL's default.
    """

    def __init__(
        self,
        image_processor: BaseImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        if chat_template is None:
            logger.warning("No chat template found with the VLM; using the default Qwen2.5-VL template.")
            chat_template = QWEN2_VL_CHAT_TEMPLATE
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


@dataclass(frozen=True)
class Translation:
    """Outcome of one translation.

    Attributes:
        prompt: the text to give both text encoders.
        translated: True when `prompt` is the parsed VLM answer, False when it is the user's
            instruction because the answer did not look right.
        raw: the VLM's decoded answer, always kept (for logs and debugging).
        fallback_reason: why the instruction was used ("empty", "truncated", "unparseable"), else None.
        duration_s: wall time of the VLM call in seconds.
        generated_tokens: number of tokens the VLM generated.
    """

    prompt: str
    translated: bool
    raw: str
    fallback_reason: str | None
    duration_s: float
    generated_tokens: int = 0


def build_translation_messages(
    images: list[Image.Image], instruction: str, task: Task
) -> list[dict[str, Any]]:
    """The chat the reference sends the VLM: one user turn, every image in order, then the text.

    Each image item carries the image itself (`"image": img`), as the reference's does (it carries a
    path); the template only looks at the item's type.
    """
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": instruction + TASK_SUFFIXES[Task(task)]})
    return [{"role": "user", "content": content}]


def parse_translation(raw: str) -> str | None:
    """Extract the prompt from a VLM answer shaped `<tag>prompt</tag>`, or None if it is not.

    Tolerates whitespace around the tags and around the prompt, and any short tag name as long as the
    same name closes it. Returns None for an answer with no tags, a missing or mismatched closing tag
    (e.g. cut off by the token budget), an empty prompt, or a prompt that still holds tags.
    """
    match = _TAGGED.fullmatch(raw.strip())
    if match is None:
        return None
    content = match.group(2).strip()
    if not content or _ANY_TAG.search(content):
        return None
    return content


def translation_from_raw(
    raw: str,
    instruction: str,
    *,
    duration_s: float = 0.0,
    generated_tokens: int = 0,
    max_new_tokens: int | None = None,
) -> Translation:
    """Turn the VLM's raw answer into a `Translation`, falling back to `instruction` when unparseable.

    `max_new_tokens` (the budget the answer was generated under) lets an answer that used the whole
    budget and does not parse be reported as "truncated" rather than "unparseable".
    """
    prompt = parse_translation(raw)
    if prompt is not None:
        return Translation(prompt, True, raw, None, duration_s, generated_tokens)
    if not raw.strip() or _is_empty_tag_pair(raw):
        reason = "empty"
    elif max_new_tokens is not None and generated_tokens >= max_new_tokens:
        reason = "truncated"
    else:
        reason = "unparseable"
    return Translation(instruction, False, raw, reason, duration_s, generated_tokens)


def _is_empty_tag_pair(raw: str) -> bool:
    match = _TAGGED.fullmatch(raw.strip())
    return match is not None and not match.group(2).strip()


class InstructionTranslator:
    """DreamOmni2's Qwen2.5-VL, loaded once, turning (images, instruction, task) into a prompt.

    The VLM lives on its own device, which may differ from the diffusion pipeline's (CPU, the same
    GPU, another GPU). Errors from the model (out of memory, bad inputs) propagate to the caller.
    """

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        processor: Qwen2_5_VLImageTextProcessor,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> InstructionTranslator:
        """Load the VLM and its processor from a `vlm-model/` folder onto `device` in `dtype`.

        Args:
            path: a local folder in the layout of xiabs/DreamOmni2's `vlm-model/` (never a Hub id:
                nothing is downloaded).
            device: where the VLM runs, e.g. "cpu", "cuda", "cuda:1".
            dtype: weight dtype (bfloat16 on GPUs in production).
            max_new_tokens: bound on the answer's length in tokens.
        """
        processor = Qwen2_5_VLImageTextProcessor.from_pretrained(str(path), local_files_only=True)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(path), dtype=dtype, device_map={"": str(torch.device(device))}, local_files_only=True
        )
        model.eval()
        return cls(model, processor, max_new_tokens=max_new_tokens)

    @property
    def device(self) -> torch.device:
        """The device the VLM runs on."""
        return self.model.device

    def prepare_inputs(self, images: list[Image.Image], instruction: str, task: Task) -> BatchFeature:
        """The VLM's inputs for one translation: the chat as token ids, and the images as patches.

        `images` should be the inputs exactly as the diffusion pipeline gets them (each resized once
        to its Kontext bucket), as in the reference; the processor then makes its own resize to
        multiples of 28 within its folder's min/max pixels.
        """
        messages = build_translation_messages(images, instruction, task)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.processor(
            text=[text],
            images=[normalize_image(image) for image in images] or None,
            return_tensors="pt",
        )

    def generate_raw(self, images: list[Image.Image], instruction: str, task: Task) -> tuple[str, int]:
        """Run the VLM greedily and return its decoded answer and the number of tokens it generated.

        Only the new tokens are decoded, special tokens skipped.
        """
        inputs = self.prepare_inputs(images, instruction, task).to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        raw = self.processor.tokenizer.decode(
            new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return raw, int(new_tokens.shape[0])

    def translate(self, images: list[Image.Image], instruction: str, task: Task) -> Translation:
        """Translate `instruction` about `images` for `task` into the prompt the LoRAs expect.

        Falls back to `instruction` itself (translated=False) when the answer does not parse; an
        exception from the model is not caught.
        """
        start = time.perf_counter()
        raw, generated_tokens = self.generate_raw(images, instruction, task)
        return translation_from_raw(
            raw,
            instruction,
            duration_s=time.perf_counter() - start,
            generated_tokens=generated_tokens,
            max_new_tokens=self.max_new_tokens,
        )
