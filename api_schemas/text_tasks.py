"""The text tasks: what the worker's language model is asked, the JSON shape its answer must take, and
how that answer becomes the job's `output`.

`judge`: score an output image against the instruction and the case's input images, as the paper's
DreamOmni2Bench does with a VLM (1 to 5 for instruction following, consistency with the inputs and
absence of distortion; a success is every score above 3). `mixing_prompts`: write (source, target)
prompt pairs for an attribute keyword, the first step of the paper's Feature Mixing data pipeline.

Both answers are decoded under their JSON schema (structured generation, `models.structured`), so the
model can only write a parseable answer of bounded length; the parsers here still check everything,
because an answer may come from elsewhere (an external judge) or be cut short. Nothing is invented:
an answer that cannot be used is `unscored` (judge) or fails the job (`unusable_answer`).

The prompts are ours. The paper's judge prompt was never published, so `JUDGE_PROMPT` is not theirs,
and a 7B judge (the worker's Qwen2.5-VL) is weaker than the Gemini 2.5 and Doubao 1.6 the paper used:
its scores are for comparing deployments with each other, not with the paper's table.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from api_schemas.checks import visible
from api_schemas.common import Task

#: The scores a judge gives, each 1 (very poor) to 5 (excellent), in the order it writes them.
JUDGE_CRITERIA = ("instruction_following", "consistency", "absence_of_distortion")
#: A score above this on every criterion is a success, as the paper counts it.
SUCCESS_ABOVE = 3
#: The longest reason a judge may write (characters).
JUDGE_REASON_MAX_CHARS = 200
#: The longest attribute keyword `mixing_prompts` takes (characters).
MAX_ATTRIBUTE_CHARS = 200

#: What the worker's VLM is asked after the images (`{inputs}`: which images are the inputs). Ours: the
#: paper's was never published.
JUDGE_PROMPT = """\
You are a strict judge of instruction-based image editing and generation. The images above are, in \
order: {inputs}, and last, the output image the model made.
The instruction the model was given: "{instruction}"
Rate the output image from 1 (very poor) to 5 (excellent) on each of three criteria:
- instruction_following: does the output do what the instruction asks, with the objects, attributes \
or styles it refers to taken from the images it names?
- consistency: is everything the instruction does not ask to change kept as it was (for an edit, the \
rest of image 1), and does what comes from an input image look as it does there?
- absence_of_distortion: is the output free of artifacts, deformed bodies, faces, hands or objects, \
and broken textures or text?
Give 5 only when nothing is wrong. Then give the main reason for your scores in one short sentence.
Answer with JSON only, in this form: {{"instruction_following": 1-5, "consistency": 1-5, \
"absence_of_distortion": 1-5, "reason": "one sentence"}}"""

#: What the worker's language model is asked for `mixing_prompts`: the paper's recipe (the source shows
#: the attribute on one subject, the target names another subject that should take it), in our words.
MIXING_PROMPTS_PROMPT = """\
You write prompt pairs for Feature Mixing, a way to make training data for image editing: a source \
image shows an attribute on one subject, and a target image shows another subject that should take \
the same attribute.
Attribute: "{attribute}"
Write {count} different pairs. In each pair:
- source_prompt: one sentence for a text-to-image model, describing an image in which one clearly \
named subject shows the attribute "{attribute}"; describe the attribute concretely on that subject, \
and the scene.
- target_prompt: one sentence describing an image of a different subject that could take that \
attribute, in a similar kind of scene; name the subject but do not describe the attribute.
Vary the subjects and scenes from pair to pair. Use letters, numbers, spaces and punctuation only; no \
quotation marks.
Answer with JSON only, in this form: {{"pairs": [{{"source_prompt": "...", "target_prompt": "..."}}]}}"""

#: What a written text may hold (the decoder's constraint, in the Rust regex syntax llguidance reads):
#: it starts with a letter or digit, then letters, marks, digits, punctuation, symbols and spaces, no
#: quotation mark or backslash (so no JSON escapes are ever needed), no control or format characters.
TEXT_PATTERN = r'^[\p{L}\p{N}][\p{L}\p{M}\p{N}\p{P}\p{S}\p{Zs}--["\\]]*$'

_SCORE_SCHEMA = {"type": "integer", "minimum": 1, "maximum": 5}


def _text_schema(max_chars: int, pattern: str | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": max_chars}
    if pattern is not None:
        schema["pattern"] = pattern
    return schema


def _object_schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def judge_answer_schema(pattern: str | None = TEXT_PATTERN) -> dict[str, Any]:
    """The JSON schema of a judge's answer: the three scores (integers 1..5), then a one-line reason.

    `pattern=None` leaves the reason's character rule out (for an endpoint whose JSON-schema support
    has no Unicode classes)."""
    properties: dict[str, Any] = dict.fromkeys(JUDGE_CRITERIA, _SCORE_SCHEMA)
    properties["reason"] = _text_schema(JUDGE_REASON_MAX_CHARS, pattern)
    return _object_schema(properties)


def mixing_prompts_schema(count: int, max_chars: int, pattern: str | None = TEXT_PATTERN) -> dict[str, Any]:
    """The JSON schema of a `mixing_prompts` answer: exactly `count` pairs of prompts of at most
    `max_chars` characters each."""
    pair = _object_schema(
        {"source_prompt": _text_schema(max_chars, pattern), "target_prompt": _text_schema(max_chars, pattern)}
    )
    return _object_schema({"pairs": {"type": "array", "minItems": count, "maxItems": count, "items": pair}})


def judge_prompt(instruction: str, input_count: int) -> str:
    """The text the judge reads after the images: `input_count` inputs, then the output."""
    if input_count == 0:
        inputs = "no input image (the instruction alone)"
    elif input_count == 1:
        inputs = "the input image, image 1"
    else:
        inputs = f"the input images, image 1 to image {input_count}"
    return JUDGE_PROMPT.format(inputs=inputs, instruction=instruction)


def mixing_prompts_prompt(attribute: str, count: int) -> str:
    """The text the language model reads for `count` pairs about `attribute`."""
    return MIXING_PROMPTS_PROMPT.format(attribute=attribute, count=count)


# Outputs -----------------------------------------------------------------------------------------------
class JudgeVerdict(BaseModel):
    """A `judge` job's `output`: the scores and reason, or `unscored` (the raw answer is the job's
    `output_raw`); never a score the answer did not give."""

    task: Literal[Task.JUDGE] = Task.JUDGE
    unscored: bool = Field(description="True: the answer could not be used; no score is given.")
    instruction_following: int | None = Field(
        default=None, ge=1, le=5, description="Does the output do what the instruction asks? 1..5."
    )
    consistency: int | None = Field(
        default=None,
        ge=1,
        le=5,
        description="Is what should stay kept, and what comes from an input like it? 1..5.",
    )
    absence_of_distortion: int | None = Field(
        default=None, ge=1, le=5, description="Is the output free of artifacts and deformations? 1..5."
    )
    reason: str | None = Field(default=None, description="The judge's main reason, one line.")
    success: bool | None = Field(
        default=None, description=f"Every score above {SUCCESS_ABOVE} (the paper's rule); null when unscored."
    )


class MixingPromptPair(BaseModel):
    """One pair, as a line of `dreamomni2 dataset`'s prompts file takes it (with the attribute)."""

    source_prompt: str = Field(description="The image that shows the attribute.")
    target_prompt: str = Field(description="The image of another subject that should take it.")


class MixingPrompts(BaseModel):
    """A `mixing_prompts` job's `output`: the attribute and its `count` pairs."""

    task: Literal[Task.MIXING_PROMPTS] = Task.MIXING_PROMPTS
    attribute: str
    pairs: list[MixingPromptPair]


#: A text job's result (the job object's `output`), told apart by its `task`.
TextOutput = Annotated[JudgeVerdict | MixingPrompts, Field(discriminator="task")]


# Parsing -----------------------------------------------------------------------------------------------
_FENCE = re.compile(r"^```[A-Za-z]*\s*|\s*```$")


def _first_object(raw: str) -> dict[str, Any] | None:
    """The first JSON object in `raw` (an external model may wrap it in a code fence or prose), else None."""
    text = _FENCE.sub("", raw.strip())
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _score(value: object) -> int | None:
    """A score 1..5: an integer (or its digit as text, as some external judges write it); else None."""
    if isinstance(value, str) and value.strip() in ("1", "2", "3", "4", "5"):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5:
        return value
    return None


def parse_judge_answer(raw: str) -> JudgeVerdict:
    """The verdict in a judge's answer, or an unscored one: every score must be there and 1..5, and
    the reason a visible text (made one line). Works on any model's answer, constrained or not."""
    answer = _first_object(raw)
    if answer is None:
        return JudgeVerdict(unscored=True)
    scores = {name: _score(answer.get(name)) for name in JUDGE_CRITERIA}
    reason = answer.get("reason")
    if any(score is None for score in scores.values()) or not isinstance(reason, str) or not visible(reason):
        return JudgeVerdict(unscored=True)
    success = all(score > SUCCESS_ABOVE for score in scores.values() if score is not None)
    return JudgeVerdict(unscored=False, reason=_one_line(reason), success=success, **scores)


class AnswerError(ValueError):
    """An answer that cannot be used; the message says why."""


def parse_mixing_prompts(raw: str, attribute: str, count: int, max_chars: int) -> MixingPrompts:
    """The `count` pairs of a `mixing_prompts` answer; raises `AnswerError` (saying why) when the
    answer is not an object with exactly `count` pairs of visible prompts of at most `max_chars`."""
    answer = _first_object(raw)
    if answer is None:
        raise AnswerError("the answer is not a JSON object (cut off by the token budget, or not JSON)")
    pairs = answer.get("pairs")
    if not isinstance(pairs, list) or len(pairs) != count:
        found = len(pairs) if isinstance(pairs, list) else "no"
        raise AnswerError(f"the answer has {found} pairs; {count} were asked for")
    parsed = []
    for number, pair in enumerate(pairs, start=1):
        prompts = [
            pair.get(name) if isinstance(pair, dict) else None for name in ("source_prompt", "target_prompt")
        ]
        for name, prompt in zip(("source_prompt", "target_prompt"), prompts, strict=True):
            if not isinstance(prompt, str) or not visible(prompt) or len(prompt.strip()) > max_chars:
                raise AnswerError(
                    f"pair {number} has no usable {name} (missing, blank or over {max_chars} characters)"
                )
        parsed.append(
            MixingPromptPair(source_prompt=_one_line(prompts[0]), target_prompt=_one_line(prompts[1]))
        )
    return MixingPrompts(attribute=attribute, pairs=parsed)
