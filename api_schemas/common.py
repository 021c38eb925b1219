"""Small enums every part of the service speaks."""

from enum import StrEnum


class Task(StrEnum):
    """What the user asks for: change image 1 (`edit`) or make a new image (`generate`)."""

    EDIT = "edit"
    GENERATE = "generate"


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
