"""The DreamOmni2 client: submit edits, generations and Feature Mixing pairs, follow them, fetch the images.

    from dreamomni2 import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        job = client.submit("make the bag in image 1 use the pattern of the dress in image 2",
                            ["bag.png", "dress.png"], seed=42)
        job = client.wait(job, on_progress=lambda p: print(p.describe()))
        client.download(job, "out.png")

        pair = client.wait(client.feature_mix("a woven straw hat", "a teapot", attribute="material"))
        client.download(pair, "hat.png", index=0)  # the source
        client.download(pair, "teapot.png", index=1)  # the target, in the hat's material

        verdict = client.wait(client.judge("make the bag red", ["bag.png"], "out.png")).output
        pairs = client.wait(client.mixing_prompts("rattan weave", 4)).output.pairs

`AsyncClient` is the same for asyncio; `verify_webhook` checks a webhook delivery; the exceptions
are in `dreamomni2.errors`. The command line is `dreamomni2` (`dreamomni2 --help`).
Needs httpx, pydantic, Pillow and standardwebhooks (tqdm for the command line); never the server's
dependencies.
"""

from api_schemas.api import ErrorInfo, Job, JobStatus, OutputFormat, Progress, ResultInfo
from api_schemas.common import AdapterChoice, MixBlocks, StepCache, Task, WebhookEvent
from api_schemas.text_tasks import JudgeVerdict, MixingPromptPair, MixingPrompts, parse_judge_answer
from dreamomni2._core import DEFAULT_SERVER, __version__
from dreamomni2.aio import AsyncClient
from dreamomni2.client import Client
from dreamomni2.errors import (
    AuthenticationError,
    ConflictError,
    DreamOmni2Error,
    InvalidInputError,
    JobCanceledError,
    JobError,
    JobFailedError,
    NotFoundError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    WaitTimeoutError,
    WebhookVerificationError,
)
from dreamomni2.events import JobEvent, JobProgress
from dreamomni2.images import ImageInput
from dreamomni2.webhooks import verify_webhook

__all__ = [
    "DEFAULT_SERVER",
    "AdapterChoice",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "DreamOmni2Error",
    "ErrorInfo",
    "ImageInput",
    "InvalidInputError",
    "Job",
    "JobCanceledError",
    "JobError",
    "JobEvent",
    "JobFailedError",
    "JobProgress",
    "JobStatus",
    "JudgeVerdict",
    "MixBlocks",
    "MixingPromptPair",
    "MixingPrompts",
    "NotFoundError",
    "OutputFormat",
    "Progress",
    "RateLimitError",
    "ResultInfo",
    "ServerError",
    "ServiceUnavailableError",
    "StepCache",
    "Task",
    "WaitTimeoutError",
    "WebhookEvent",
    "WebhookVerificationError",
    "__version__",
    "parse_judge_answer",
    "verify_webhook",
]
