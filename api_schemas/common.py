"""Small enums every part of the service speaks."""

from enum import StrEnum

#: The largest seed: 2^53 - 1, the largest integer a JavaScript number (and so JSON in a browser)
#: holds exactly; a seed shown in a web page must reproduce the image.
MAX_SEED = 2**53 - 1


class Task(StrEnum):
    """What the user asks for: change image 1 (`edit`), make a new image (`generate`), make a pair
    of images that share one attribute (`feature_mixing`, the method's paired-data synthesis), or have
    the worker's language model write JSON: score an output image (`judge`), or write Feature Mixing
    prompt pairs for an attribute keyword (`mixing_prompts`)."""

    EDIT = "edit"
    GENERATE = "generate"
    FEATURE_MIXING = "feature_mixing"
    JUDGE = "judge"
    MIXING_PROMPTS = "mixing_prompts"

    @property
    def writes_text(self) -> bool:
        """Whether the job's result is JSON written by the worker's language model, not images."""
        return self in (Task.JUDGE, Task.MIXING_PROMPTS)


class MixBlocks(StrEnum):
    """Which transformer blocks mix in Feature Mixing: all of them, the double-stream (joint) blocks
    only, the single-stream blocks only, or none (the target is then an ordinary generation)."""

    ALL = "all"
    DOUBLE = "double"
    SINGLE = "single"
    NONE = "none"


class AdapterChoice(StrEnum):
    """Which weights sample the image: plain FLUX.1 Kontext or one of the DreamOmni2 LoRAs."""

    BASE = "base"
    EDIT = "edit"
    GENERATION = "generation"


class WebhookEvent(StrEnum):
    """What a job's webhook is sent for: it started, it moved (throttled), it ended."""

    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"


class StepCache(StrEnum):
    """Step caching: reuse work across denoising steps (faster, at some quality cost), or not.

    `first_block`: diffusers' First Block Cache; the rest of the transformer is skipped on a step
    whose first block changed less than a threshold (adaptive). `taylorseer`: TaylorSeer, a fixed
    schedule: a full pass every N steps after a few full warm-up steps, predicted in between.
    """

    NONE = "none"
    FIRST_BLOCK = "first_block"
    TAYLORSEER = "taylorseer"
