"""Text jobs on the tiny preset: structured decoding makes the random VLM's answers parse (and without
it they do not), the budget always fits the longest valid answer, cancel and a missing translator end
a job cleanly, and the worst cases stay within the planner's translator peak."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from llguidance import LLMatcher

from api_schemas.checks import visible
from api_schemas.common import Task
from api_schemas.errors import JobCanceled, TranslatorUnavailable
from api_schemas.jobs import JobLimits, JobParameters, resolve_job
from api_schemas.text_tasks import (
    JUDGE_CRITERIA,
    JudgeVerdict,
    MixingPrompts,
    judge_answer_schema,
    judge_prompt,
    mixing_prompts_schema,
    parse_judge_answer,
)
from models.engine import Engine
from models.settings import EngineSettings
from models.structured import JSON_OPTIONS, max_answer_bytes
from models.text_jobs import JUDGE_MAX_PIXELS, generate_json, json_decoding, judge_view

#: Short prompts keep the random model's answers (which always run to the length limit) quick.
PROMPT_CHARS = 12


def noise_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def engine(tiny_cache) -> Engine:
    limits = JobLimits(mixing_prompt_max_chars=PROMPT_CHARS)
    return Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", limits=limits)
    )


def no_progress(stage: str, step: int, total: int, **preview: object) -> None:
    pass


def test_the_random_judge_answers_valid_json_that_parses_into_scores(engine: Engine):
    images = [noise_image(64, 48, 1), noise_image(48, 64, 2)]
    seen: list[tuple[str, int, int]] = []
    job = JobParameters(task="judge", instruction="put the hat of image 2 on the dog")

    output = engine.run(images, job, on_progress=lambda *update, **_: seen.append(update))

    meta = output.metadata
    assert output.images == [] and meta.task is Task.JUDGE and meta.steps == 0
    answer = json.loads(meta.output_raw)  # compact JSON, keys in the schema's order
    assert list(answer) == [*JUDGE_CRITERIA, "reason"]
    assert isinstance(meta.output, JudgeVerdict) and not meta.output.unscored
    assert meta.output == parse_judge_answer(meta.output_raw)
    assert meta.output.success == all(answer[name] > 3 for name in JUDGE_CRITERIA)
    budget = json_decoding(engine.translator).budget(judge_answer_schema())
    assert 0 < meta.output_tokens <= budget
    assert meta.prompt == judge_prompt(job.instruction, 1)
    assert set(meta.timings) == {"generate", "total"}
    assert {stage for stage, *_ in seen} == {"generate"} and seen[-1] == (
        "generate",
        meta.output_tokens,
        budget,
    )


def test_without_the_constraint_the_same_model_writes_no_json(engine: Engine):
    # The control: what makes the answer parse is the constraint, not the model.
    translator = engine.translator
    chat = translator.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": judge_prompt("make it red", 0)}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = translator.processor(text=[chat], return_tensors="pt")
    with torch.inference_mode():
        out = translator.model.generate(**inputs, do_sample=False, max_new_tokens=64)
    raw = translator.processor.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert parse_judge_answer(raw).unscored


def test_the_random_prompt_writer_writes_the_pairs_asked_for_and_feature_mixing_takes_them(engine: Engine):
    output = engine.run([], JobParameters(task="mixing_prompts", attribute="rattan weave", count=2))

    prompts = output.metadata.output
    assert isinstance(prompts, MixingPrompts) and prompts.attribute == "rattan weave"
    assert len(prompts.pairs) == 2 and json.loads(output.metadata.output_raw)["pairs"]
    for pair in prompts.pairs:
        for text in (pair.source_prompt, pair.target_prompt):
            assert visible(text) and 0 < len(text) <= PROMPT_CHARS and '"' not in text
        # What the prompts command writes, the service takes as a Feature Mixing pair.
        mixing = JobParameters(task="feature_mixing", **pair.model_dump(), attribute=prompts.attribute)
        assert resolve_job(mixing, 0, engine.limits).source_prompt == pair.source_prompt


def test_the_budget_fits_the_longest_valid_answer(engine: Engine):
    # The longest answer the schema allows: every text at its limit in 4-byte characters (U+20000 is
    # a letter), every score as long as it gets. It is valid, its size is the bound, and its tokens
    # fit the budget (a token is at least a byte).
    schema = mixing_prompts_schema(2, 5)
    longest = "\U00020000" * 5
    pair = {"source_prompt": longest, "target_prompt": longest}
    answer = json.dumps({"pairs": [pair, pair]}, ensure_ascii=False, separators=(",", ":"))
    assert len(answer.encode()) == max_answer_bytes(schema)
    decoding = json_decoding(engine.translator)
    matcher = LLMatcher(
        decoding.tokenizer, LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    )
    tokens = engine.translator.processor.tokenizer.encode(answer, add_special_tokens=False)
    assert matcher.consume_tokens(tokens) and matcher.is_accepting()
    assert len(tokens) < decoding.budget(schema)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string"},
        {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5}},
        {"type": "integer", "minimum": 1},
        {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]},
        {"type": "number"},
    ],
)
def test_a_schema_without_a_length_bound_is_refused(schema: dict):
    with pytest.raises(ValueError):
        max_answer_bytes(schema)


def test_a_cancel_stops_the_answer_mid_way(engine: Engine):
    checks = iter([False, False, True])
    with pytest.raises(JobCanceled):
        generate_json(
            engine.translator, [], "write", mixing_prompts_schema(2, 200), no_progress, lambda: next(checks)
        )


def test_a_worker_without_the_translator_fails_a_text_job_cleanly(engine: Engine, monkeypatch):
    monkeypatch.setattr(engine, "translator", None)  # as DREAMOMNI2_TRANSLATOR=false leaves it
    for images, job in (
        ([noise_image(32, 32, 0)], JobParameters(task="judge", instruction="make it red")),
        ([], JobParameters(task="mixing_prompts", attribute="wool")),
    ):
        with pytest.raises(TranslatorUnavailable, match="DREAMOMNI2_TRANSLATOR=false"):
            engine.run(images, job)


def test_the_judge_sees_each_image_at_most_at_its_pixel_budget():
    big, small = judge_view(noise_image(2048, 1024, 0)), judge_view(noise_image(300, 200, 0))
    assert big.width * big.height <= JUDGE_MAX_PIXELS and abs(big.width / big.height - 2) < 0.01
    assert small.size == (300, 200)


def test_the_worst_text_jobs_stay_within_the_translators_planned_peak():
    # The planner's own count for the published Qwen2.5-VL-7B (bf16): at the default limits a
    # translation of DREAMOMNI2_MAX_IMAGES with its 1024-token budget is the larger, so the memory
    # check needs no more room for text jobs; limits raised far past them make the plan (and so the
    # start-up check) count the worst text job instead.
    from models.memory import plan_memory
    from models.memory.sizes import published_sizes
    from models.memory.tracing import job_shape, text_job_bytes, translator_bytes

    limits = JobLimits()
    sizes = published_sizes()
    shape = job_shape(limits.max_images, 1024, sizes.vlm_pixels)
    translation = translator_bytes(sizes, shape, 1024)
    assert text_job_bytes(sizes, shape, limits) < translation
    plan = plan_memory("resident", limits.max_images, sizes=sizes, text_jobs=limits)
    assert plan.activations["translate"] == translation
    raised = JobLimits(max_mixing_prompts=64, mixing_prompt_max_chars=2000)
    bigger = plan_memory("resident", limits.max_images, sizes=sizes, text_jobs=raised)
    assert bigger.activations["translate"] == text_job_bytes(sizes, shape, raised) > 4 * translation
