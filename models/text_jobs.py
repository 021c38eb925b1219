"""The text jobs: the worker's Qwen2.5-VL writes JSON under a schema (`judge`, `mixing_prompts`).

No image is sampled: the translator's model answers one user turn (for a judge, the case's images and
the output, then the judge prompt; for prompt pairs, the prompt alone), decoded greedily under the
task's JSON schema (`models.structured`), and the answer is parsed into the job's `output`
(`api_schemas.text_tasks`). The raw answer is kept in the metadata either way.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from api_schemas.common import StepCache, Task
from api_schemas.errors import JobCanceled, TranslatorUnavailable, UnusableAnswer
from api_schemas.images import normalize_image
from api_schemas.jobs import ResolvedJob
from api_schemas.metadata import JobMetadata
from api_schemas.text_tasks import (
    AnswerError,
    judge_answer_schema,
    judge_prompt,
    mixing_prompts_prompt,
    mixing_prompts_schema,
    parse_judge_answer,
    parse_mixing_prompts,
)
from models.modes import Group, Stage
from models.sampling import JobOutput, ProgressCallback
from models.stages import stage
from models.translator import InstructionTranslator

if TYPE_CHECKING:
    from models.engine import Engine
    from models.structured import JsonDecoding

#: The most pixels of each image a judge sees. The judge reads up to DREAMOMNI2_MAX_IMAGES + 1 images;
#: at this size (about 330 vision tokens each for Qwen2.5-VL) they take a third of what a translation of
#: DREAMOMNI2_MAX_IMAGES bucketed images (about 1300 each) does, so a judge stays within the memory the
#: planner budgets for the translator.
JUDGE_MAX_PIXELS = 512 * 512
#: How much of a raw answer a failed job's error keeps (`details.raw`).
RAW_IN_ERROR_CHARS = 4000

_decodings: weakref.WeakKeyDictionary[InstructionTranslator, JsonDecoding] = weakref.WeakKeyDictionary()


def json_decoding(translator: InstructionTranslator) -> JsonDecoding:
    """The translator's structured-decoding tables, built on first use and kept with it."""
    # Imported here: llguidance loads with the first text job, so that the engine imports without it
    # (the GPU suite's machine carries wheels for the image jobs only).
    from models.structured import JsonDecoding

    decoding = _decodings.get(translator)
    if decoding is None:
        model = translator.model
        eos = model.generation_config.eos_token_id
        eos_ids = (
            [eos] if isinstance(eos, int) else list(eos or [translator.processor.tokenizer.eos_token_id])
        )
        vocab_size = model.get_output_embeddings().weight.shape[0]
        decoding = _decodings[translator] = JsonDecoding(translator.processor.tokenizer, vocab_size, eos_ids)
    return decoding


def judge_view(image: PIL.Image.Image) -> PIL.Image.Image:
    """An image as the judge sees it: RGB, EXIF applied, scaled down (Lanczos) to at most
    `JUDGE_MAX_PIXELS` at its own aspect ratio."""
    image = normalize_image(image)
    area = image.width * image.height
    if area <= JUDGE_MAX_PIXELS:
        return image
    scale = math.sqrt(JUDGE_MAX_PIXELS / area)
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, PIL.Image.Resampling.LANCZOS)


def generate_json(
    translator: InstructionTranslator,
    images: list[PIL.Image.Image],
    text: str,
    schema: dict[str, Any],
    progress: ProgressCallback,
    cancel: Callable[[], bool],
) -> tuple[str, int]:
    """The model's answer to one user turn (the images in order, then `text`), decoded greedily under
    `schema`; returns the decoded answer and the number of tokens generated.

    Progress is reported as stage `generate` (tokens written of the budget); `cancel()` is checked
    every few tokens and a true answer raises `JobCanceled`.
    """
    from models.structured import Watch  # here: see `json_decoding`

    decoding = json_decoding(translator)
    budget = decoding.budget(schema)
    constraint = decoding.processor(schema)
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": text})
    processor = translator.processor
    chat = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[chat], images=images or None, return_tensors="pt").to(translator.device)
    prompt_length = inputs["input_ids"].shape[1]

    def check() -> None:
        if cancel():
            raise JobCanceled("The job was canceled while its answer was being written.")

    watch = Watch(prompt_length, lambda written: progress("generate", written, budget), check)
    progress("generate", 0, budget)
    with torch.inference_mode():
        output = translator.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=budget,
            logits_processor=LogitsProcessorList([constraint]),
            stopping_criteria=StoppingCriteriaList([watch]),
        )
    new_tokens = output[0, prompt_length:]
    raw = processor.tokenizer.decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    progress("generate", int(new_tokens.shape[0]), budget)
    return raw, int(new_tokens.shape[0])


def run_text_job(
    engine: Engine,
    job: ResolvedJob,
    uploads: list[PIL.Image.Image],
    progress: ProgressCallback,
    cancel: Callable[[], bool],
) -> JobOutput:
    """Run a `judge` or `mixing_prompts` job on the engine's translator; the output has no image.

    Raises `TranslatorUnavailable` on an engine without the translator, `UnusableAnswer` for prompt
    pairs whose answer does not parse (a judge's is `unscored` instead), `JobCanceled` on a cancel.
    """
    translator = engine.translator
    if translator is None:
        raise TranslatorUnavailable(
            f"task={job.task.value} needs the worker's language model, and this deployment runs without it "
            "(DREAMOMNI2_TRANSLATOR=false); use a deployment with the translator on."
        )
    started = time.perf_counter()
    if job.task is Task.JUDGE:
        assert job.instruction is not None, "a resolved judge job has its instruction"
        images = [judge_view(image) for image in uploads]
        text = judge_prompt(job.instruction, len(images) - 1)
        schema = judge_answer_schema()
    else:
        assert job.attribute is not None and job.count is not None, "a resolved job has both"
        images = []
        text = mixing_prompts_prompt(job.attribute, job.count)
        max_chars = engine.limits.mixing_prompt_max_chars
        schema = mixing_prompts_schema(job.count, max_chars)
    if cancel():
        raise JobCanceled("The job was canceled before its answer was written.")
    with engine.placement.running(Group.TRANSLATOR), stage(Stage.TRANSLATE):
        raw, tokens = generate_json(translator, images, text, schema, progress, cancel)
    if job.task is Task.JUDGE:
        output: Any = parse_judge_answer(raw)
    else:
        try:
            output = parse_mixing_prompts(raw, job.attribute, job.count, max_chars)
        except AnswerError as exc:
            raise UnusableAnswer(
                f"The language model's answer could not be used: {exc}. Its raw text is in details.raw.",
                details={"raw": raw[:RAW_IN_ERROR_CHARS], "tokens": tokens},
            ) from None
    elapsed = time.perf_counter() - started
    metadata = JobMetadata(
        prompt=text,
        translated=False,
        adapter=job.adapter,
        task=job.task,
        steps=job.steps,
        guidance=job.guidance,
        image_count=job.image_count,
        speed_profile=engine.profile.serving,
        step_cache=StepCache.NONE,
        timings={"generate": elapsed, "total": elapsed},
        output=output,
        output_raw=raw,
        output_tokens=tokens,
    )
    return JobOutput(images=[], metadata=metadata)
