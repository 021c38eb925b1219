"""The text tasks' contract: the answer parsers on good, bad and truncated answers, the requests a
judge and a prompt writer take (and refuse), and the prompts as the README shows them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api_schemas.common import AdapterChoice, Task
from api_schemas.errors import ErrorCode, InvalidInput
from api_schemas.jobs import JobLimits, JobParameters, resolve_job
from api_schemas.text_tasks import (
    JUDGE_PROMPT,
    MIXING_PROMPTS_PROMPT,
    AnswerError,
    JudgeVerdict,
    MixingPrompts,
    judge_prompt,
    parse_judge_answer,
    parse_mixing_prompts,
)

ROOT = Path(__file__).resolve().parents[2]
GOOD_JUDGE = (
    '{"instruction_following":4,"consistency":5,"absence_of_distortion":4,"reason":"The bag is red."}'
)
GOOD_PAIRS = json.dumps(
    {
        "pairs": [
            {"source_prompt": "A rattan chair on a porch.", "target_prompt": "A lamp in a bedroom."},
            {"source_prompt": "A rattan basket of apples.", "target_prompt": "A handbag on a desk."},
        ]
    }
)


# --- the judge's answer ----------------------------------------------------------------------------------
def test_a_good_answer_gives_its_scores_and_success_is_every_score_above_3():
    verdict = parse_judge_answer(GOOD_JUDGE)
    assert verdict == JudgeVerdict(
        unscored=False,
        instruction_following=4,
        consistency=5,
        absence_of_distortion=4,
        reason="The bag is red.",
        success=True,
    )
    three = parse_judge_answer(GOOD_JUDGE.replace('"consistency":5', '"consistency":3'))
    assert not three.unscored and three.success is False


@pytest.mark.parametrize(
    "raw",
    [
        "```json\n" + GOOD_JUDGE + "\n```",  # an external model's code fence
        "Here is my verdict: " + GOOD_JUDGE + " Hope this helps.",
        GOOD_JUDGE.replace(":4,", ':"4",', 1),  # a score written as its digit
        GOOD_JUDGE.replace('"The bag is red."', '"The bag\\nis   red."'),  # made one line
    ],
)
def test_answers_an_external_judge_writes_are_read_too(raw: str):
    verdict = parse_judge_answer(raw)
    assert not verdict.unscored and verdict.success is True
    assert (verdict.instruction_following, verdict.reason) == (4, "The bag is red.")


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "The output follows the instruction well.",  # prose, no JSON
        "[4, 5, 4]",  # JSON, not an object
        GOOD_JUDGE.replace(':4,"consistency"', ':6,"consistency"'),  # out of range
        GOOD_JUDGE.replace(':4,"consistency"', ':0,"consistency"'),
        GOOD_JUDGE.replace(':4,"consistency"', ':4.5,"consistency"'),
        GOOD_JUDGE.replace(':4,"consistency"', ':true,"consistency"'),
        GOOD_JUDGE.replace('"absence_of_distortion":4,', ""),  # a score missing
        GOOD_JUDGE.replace('"The bag is red."', '"\\u200b "'),  # an invisible reason
        GOOD_JUDGE.replace('"The bag is red."', "null"),
    ],
)
def test_an_answer_without_every_score_and_a_reason_is_unscored_never_filled_in(raw: str):
    verdict = parse_judge_answer(raw)
    assert verdict == JudgeVerdict(unscored=True)
    assert verdict.success is None and verdict.instruction_following is None


@pytest.mark.parametrize("cut", [1, 10, 30, len(GOOD_JUDGE) - 20, len(GOOD_JUDGE) - 1])
def test_a_truncated_answer_is_unscored(cut: int):
    assert parse_judge_answer(GOOD_JUDGE[:cut]).unscored


# --- the prompt writer's answer ---------------------------------------------------------------------------
def test_good_pairs_are_parsed_with_their_attribute():
    prompts = parse_mixing_prompts(GOOD_PAIRS, "rattan weave", 2, max_chars=200)
    assert isinstance(prompts, MixingPrompts) and prompts.attribute == "rattan weave"
    assert [p.source_prompt for p in prompts.pairs] == [
        "A rattan chair on a porch.",
        "A rattan basket of apples.",
    ]
    assert prompts.pairs[1].target_prompt == "A handbag on a desk."


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("", "not a JSON object"),
        ('{"pairs": "a chair"}', "has no pairs"),
        (json.dumps({"pairs": json.loads(GOOD_PAIRS)["pairs"][:1]}), "has 1 pairs; 2 were asked for"),
        (GOOD_PAIRS.replace("A lamp in a bedroom.", " "), "pair 1 has no usable target_prompt"),
        (GOOD_PAIRS.replace('"A rattan basket of apples."', "7"), "pair 2 has no usable source_prompt"),
        (GOOD_PAIRS.replace("A lamp in a bedroom.", "x" * 201), "over 200 characters"),
    ],
)
def test_bad_pairs_are_refused_saying_why(raw: str, why: str):
    with pytest.raises(AnswerError, match=why):
        parse_mixing_prompts(raw, "rattan weave", 2, max_chars=200)


@pytest.mark.parametrize("cut", [1, 12, len(GOOD_PAIRS) // 2, len(GOOD_PAIRS) - 2])
def test_truncated_pairs_are_refused(cut: int):
    with pytest.raises(AnswerError):
        parse_mixing_prompts(GOOD_PAIRS[:cut], "rattan weave", 2, max_chars=200)


# --- requests -----------------------------------------------------------------------------------------------
LIMITS = JobLimits(max_images=3, max_mixing_prompts=4)


def test_a_judge_takes_the_inputs_and_the_output_last_and_samples_nothing():
    job = resolve_job(JobParameters(task="judge", instruction="  make the bag red "), 4, LIMITS)
    assert (job.task, job.instruction, job.image_count) == (Task.JUDGE, "make the bag red", 4)
    assert (job.steps, job.adapter, job.translate, job.loras) == (0, AdapterChoice.BASE, False, [])
    # The worker re-checks what the gateway resolved: the same job comes back.
    assert resolve_job(job.parameters(), 4, LIMITS) == job


def test_a_prompt_writer_takes_an_attribute_and_a_count_default_1():
    job = resolve_job(JobParameters(task="mixing_prompts", attribute=" rattan weave "), 0, LIMITS)
    assert (job.task, job.attribute, job.count, job.image_count) == (
        Task.MIXING_PROMPTS,
        "rattan weave",
        1,
        0,
    )
    assert resolve_job(job.parameters(), 0, LIMITS) == job


@pytest.mark.parametrize(
    ("fields", "images", "code"),
    [
        ({"task": "judge", "instruction": "x", "steps": 4}, 2, ErrorCode.FIELD_NOT_FOR_TASK),
        ({"task": "judge", "instruction": "x", "seed": 1, "width": 64}, 2, ErrorCode.FIELD_NOT_FOR_TASK),
        (
            {"task": "judge", "instruction": "x", "loras": [{"name": "style"}]},
            2,
            ErrorCode.FIELD_NOT_FOR_TASK,
        ),
        ({"task": "judge", "instruction": "x", "count": 2}, 2, ErrorCode.FIELD_NOT_FOR_TASK),
        ({"task": "judge", "instruction": "x"}, 0, ErrorCode.JUDGE_NEEDS_OUTPUT),
        ({"task": "judge", "instruction": "\u200b "}, 2, ErrorCode.EMPTY_INSTRUCTION),
        ({"task": "judge"}, 2, ErrorCode.EMPTY_INSTRUCTION),
        ({"task": "judge", "instruction": "x" * 2001}, 2, ErrorCode.INSTRUCTION_TOO_LONG),
        ({"task": "judge", "instruction": "x"}, 5, ErrorCode.TOO_MANY_IMAGES),  # 3 inputs + 1 output at most
        ({"task": "mixing_prompts", "attribute": "wool"}, 1, ErrorCode.FIELD_NOT_FOR_TASK),
        (
            {"task": "mixing_prompts", "attribute": "wool", "instruction": "x"},
            0,
            ErrorCode.FIELD_NOT_FOR_TASK,
        ),
        ({"task": "mixing_prompts", "attribute": "wool", "steps": 3}, 0, ErrorCode.FIELD_NOT_FOR_TASK),
        ({"task": "mixing_prompts"}, 0, ErrorCode.EMPTY_ATTRIBUTE),
        ({"task": "mixing_prompts", "attribute": "\u3164"}, 0, ErrorCode.EMPTY_ATTRIBUTE),
        ({"task": "mixing_prompts", "attribute": "w" * 201}, 0, ErrorCode.PROMPT_TOO_LONG),
        ({"task": "mixing_prompts", "attribute": "wool", "count": 0}, 0, ErrorCode.INVALID_COUNT),
        ({"task": "mixing_prompts", "attribute": "wool", "count": 5}, 0, ErrorCode.INVALID_COUNT),
        ({"task": "mixing_prompts", "attribute": "wool", "count": 10**30}, 0, ErrorCode.INVALID_COUNT),
        ({"task": "edit", "instruction": "x", "count": 2}, 1, ErrorCode.FIELD_NOT_FOR_TASK),
        ({"instruction": "x", "count": 2}, 0, ErrorCode.FIELD_NOT_FOR_TASK),
        ({"task": "edit", "instruction": "x"}, 4, ErrorCode.TOO_MANY_IMAGES),  # only a judge takes one more
    ],
)
def test_what_a_text_task_does_not_take_is_refused_by_name(fields: dict, images: int, code: ErrorCode):
    with pytest.raises(InvalidInput) as refused:
        resolve_job(JobParameters(**fields), images, LIMITS)
    assert refused.value.code is code, refused.value.message


def test_written_prompts_must_fit_the_prompt_limit_of_feature_mixing():
    with pytest.raises(ValueError, match="DREAMOMNI2_MIXING_PROMPT_MAX_CHARS"):
        JobLimits(max_instruction_chars=100, mixing_prompt_max_chars=101)


# --- the prompts, as documented ---------------------------------------------------------------------------
def test_the_judge_prompt_names_the_inputs_then_the_output():
    assert "image 1 to image 3, and last, the output image" in judge_prompt("make it red", 3)
    assert "the input image, image 1, and last" in judge_prompt("make it red", 1)
    assert "no input image" in judge_prompt("a cat", 0)
    assert '"make it red"' in judge_prompt("make it red", 1)


def test_the_readme_shows_both_prompts_and_says_whose_they_are():
    readme = " ".join((ROOT / "README.md").read_text().split())
    for prompt in (
        JUDGE_PROMPT.format(inputs="{inputs}", instruction="{instruction}"),
        MIXING_PROMPTS_PROMPT.format(attribute="{attribute}", count="{count}"),
    ):
        assert " ".join(prompt.split()) in readme
    assert "The paper's judge prompt was never published: the prompt below is ours, not theirs" in readme
    assert "a 7B judge is weaker than the Gemini 2.5" in readme
