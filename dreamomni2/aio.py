"""The asyncio client: `AsyncClient`, the same calls as `Client`, awaited."""

from __future__ import annotations

import asyncio
import inspect
import io
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from types import TracebackType

import httpx
from PIL import Image

from api_schemas.api import Job, OutputFormat
from api_schemas.common import MixBlocks, StepCache, Task, WebhookEvent
from dreamomni2._core import (
    USER_AGENT,
    JobRef,
    LoraInput,
    Prepared,
    Quiet,
    StreamFollower,
    backoff,
    ended,
    job_id_of,
    job_path,
    no_signed_url,
    prepare_submission,
    prepare_text_job,
    reached_server,
    resolve_api_key,
    resolve_server,
    result_path,
    retryable,
    signed_result_url,
    succeeded,
)
from dreamomni2.errors import (
    ConflictError,
    DreamOmni2Error,
    JobError,
    error_from_response,
    error_from_transport,
    job_error,
)
from dreamomni2.events import JobEvent, JobProgress, ProgressTracker
from dreamomni2.images import ImageInput

#: What `wait(on_progress=...)` calls with each update: a plain function or a coroutine function.
AsyncProgressCallback = Callable[[JobProgress], object]


class AsyncClient:
    """A client of the DreamOmni2 service for asyncio; the same calls and arguments as `Client`.

        async with AsyncClient("http://127.0.0.1:8000", api_key="...") as client:
            job = await client.submit("a lighthouse at dusk", task="generate", steps=28)
            job = await client.wait(job, on_progress=lambda p: print(p.describe()))
            image = await client.result_image(job)

    Args: as `Client`; `http_client` is an `httpx.AsyncClient`.
    """

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.server = resolve_server(server)
        self.max_retries = max_retries
        self._headers = {"User-Agent": USER_AGENT}
        key = resolve_api_key(api_key)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._timeout = timeout

    # Lifecycle ----------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the connections (not those of an `http_client` you passed in)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()

    # Sending ------------------------------------------------------------------------------------------
    async def _send(self, request: Prepared) -> httpx.Response:
        """Send with retries; returns a 2xx answer, raises the typed error of anything else."""
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    request.method,
                    self.server + request.path,
                    headers={**self._headers, **request.headers},
                    files=request.files,
                )
            except httpx.TransportError as exc:
                error: DreamOmni2Error = error_from_transport(exc, self.server)
                may_resend = request.idempotent or not reached_server(exc)
                if attempt >= self.max_retries or not may_resend:
                    raise error from exc
            else:
                if response.is_success:
                    return response
                error = error_from_response(response)
                if attempt >= self.max_retries or not retryable(error):
                    raise error
            await asyncio.sleep(backoff(attempt, error))
            attempt += 1

    async def _job(self, request: Prepared) -> Job:
        return Job.model_validate_json((await self._send(request)).content)

    # Jobs ---------------------------------------------------------------------------------------------
    async def submit(
        self,
        instruction: str,
        images: Sequence[ImageInput] = (),
        *,
        task: Task | str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        num_images: int | None = None,
        loras: Sequence[LoraInput] | None = None,
        guidance: float | None = None,
        size: tuple[int, int] | None = None,
        translate: bool | None = None,
        output_format: OutputFormat | str | None = None,
        step_cache: StepCache | str | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[WebhookEvent | str] | None = None,
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue an edit or a generation; returns the job object. Arguments and errors: `Client.submit`."""
        # Reading and encoding the images is quick next to the upload; it stays on the event loop.
        request = prepare_submission(
            instruction,
            images,
            task=task,
            seed=seed,
            steps=steps,
            num_images=num_images,
            loras=loras,
            guidance=guidance,
            size=size,
            translate=translate,
            output_format=output_format,
            step_cache=step_cache,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            deadline_s=deadline_s,
            idempotency_key=idempotency_key,
        )
        return await self._job(request)

    async def feature_mix(
        self,
        source_prompt: str,
        target_prompt: str,
        *,
        attribute: str | None = None,
        mix_blocks: MixBlocks | str | None = None,
        mix_steps: float | None = None,
        mix_strength: float | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        size: tuple[int, int] | None = None,
        output_format: OutputFormat | str | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[WebhookEvent | str] | None = None,
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a Feature Mixing pair; returns the job object. Arguments and errors: `Client.feature_mix`."""
        request = prepare_submission(
            None,
            (),
            task=Task.FEATURE_MIXING,
            seed=seed,
            steps=steps,
            guidance=guidance,
            size=size,
            translate=None,
            output_format=output_format,
            step_cache=None,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            deadline_s=deadline_s,
            idempotency_key=idempotency_key,
            source_prompt=source_prompt,
            target_prompt=target_prompt,
            attribute=attribute,
            mix_blocks=mix_blocks,
            mix_steps=mix_steps,
            mix_strength=mix_strength,
        )
        return await self._job(request)

    async def judge(
        self,
        instruction: str,
        inputs: Sequence[ImageInput],
        output: ImageInput,
        *,
        webhook_url: str | None = None,
        webhook_events: Sequence[WebhookEvent | str] | None = None,
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a `judge` job (the output image last); returns the job object. See `Client.judge`."""
        request = prepare_text_job(
            Task.JUDGE,
            instruction=instruction,
            images=[*inputs, output],
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            deadline_s=deadline_s,
            idempotency_key=idempotency_key,
        )
        return await self._job(request)

    async def mixing_prompts(
        self,
        attribute: str,
        count: int | None = None,
        *,
        webhook_url: str | None = None,
        webhook_events: Sequence[WebhookEvent | str] | None = None,
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a `mixing_prompts` job; returns the job object. See `Client.mixing_prompts`."""
        request = prepare_text_job(
            Task.MIXING_PROMPTS,
            attribute=attribute,
            count=count,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            deadline_s=deadline_s,
            idempotency_key=idempotency_key,
        )
        return await self._job(request)

    async def get(self, job: JobRef) -> Job:
        """The job object now (see `Client.get`)."""
        return await self._job(Prepared("GET", job_path(job), idempotent=True))

    async def cancel(self, job: JobRef) -> Job:
        """Cancel a job; returns it after the request (see `Client.cancel`)."""
        return await self._job(Prepared("POST", job_path(job, "/cancel"), idempotent=False))

    async def events(
        self, job: JobRef, *, last_event_id: str | None = None, timeout: float | None = None
    ) -> AsyncIterator[JobEvent]:
        """The job's events up to the final one, resumed across dropped connections (see `Client.events`)."""
        follower = StreamFollower(
            job_id_of(job), last_event_id=last_event_id, timeout=timeout, max_retries=self.max_retries
        )
        # Closed here, not whenever the garbage collector gets to it: the connection goes with it.
        async with aclosing(self._follow(follower)) as stream:
            async for event in stream:
                if event is not None:
                    yield event

    async def wait(
        self,
        job: JobRef,
        *,
        on_progress: AsyncProgressCallback | None = None,
        timeout: float | None = None,
        queue_poll_s: float = 2.0,
    ) -> Job:
        """Wait for the job to end; returns the succeeded job (see `Client.wait`).

        `on_progress` may be a plain function or a coroutine function (awaited).
        """
        job_id = job_id_of(job)
        tracker = ProgressTracker(job_id)
        follower = StreamFollower(
            job_id, timeout=timeout, queue_poll_s=queue_poll_s, max_retries=self.max_retries
        )
        async for event in self._follow(follower):
            update = (
                tracker.from_event(event) if event is not None else tracker.from_job(await self.get(job_id))
            )
            if update is not None and on_progress is not None:
                outcome = on_progress(update)
                if inspect.isawaitable(outcome):
                    await outcome
            if event is not None and event.job is not None:
                return succeeded(event.job)
        # The stream ended without a final event: it was over before (a 204). The job says how it ended.
        return ended(await self.get(job_id))

    async def _follow(self, follower: StreamFollower) -> AsyncGenerator[JobEvent | None, None]:
        """As `Client._follow`: events across reconnects; None when a queued job's stream was quiet."""
        while not follower.over:
            try:
                async with aclosing(self._connection(follower)) as connection:
                    async for event in connection:
                        yield event
            except httpx.ReadTimeout as exc:
                quiet = follower.timed_out()
                if quiet is Quiet.POLL:
                    yield None
                elif quiet is Quiet.DEAD:
                    follower.failed(error_from_transport(exc, self.server))
            except httpx.TransportError as exc:
                follower.failed(error_from_transport(exc, self.server))
            await asyncio.sleep(follower.take_delay())

    async def _connection(self, follower: StreamFollower) -> AsyncGenerator[JobEvent, None]:
        """The events of one connection to the stream."""
        request = follower.request()
        async with self._http.stream(
            request.method,
            self.server + request.path,
            headers={**self._headers, **request.headers},
            timeout=httpx.Timeout(self._timeout, read=follower.read_timeout()),
        ) as response:
            if response.status_code == 204:
                follower.finish()
            elif not response.is_success:
                await response.aread()
                follower.refused(error_from_response(response))
            else:
                async for line in response.aiter_lines():
                    event = follower.feed(line)
                    if event is not None:
                        yield event
                    if follower.over:
                        return
                follower.failed(follower.ended_early())

    # Results ------------------------------------------------------------------------------------------
    async def result_bytes(self, job: JobRef, index: int = 0) -> bytes:
        """Result image `index` as encoded bytes (1: a Feature Mixing pair's target); `index` and errors
        as `Client.result_bytes`."""
        try:
            return (await self._send(Prepared("GET", result_path(job, index), idempotent=True))).content
        except ConflictError as exc:
            if exc.code not in ("job_failed", "job_canceled"):
                raise
            error: JobError | None = job_error(await self.get(job), status=exc.status)
            raise (error if error is not None else exc) from None

    async def result_url(self, job: JobRef, index: int = 0, *, min_valid_s: float = 60.0) -> str:
        """An absolute link to result image `index` that needs no API key (see `Client.result_url`)."""
        result_path(job, index)  # the index's own check
        if isinstance(job, Job) and (url := signed_result_url(job, index, min_valid_s)):
            return url
        fresh = await self.get(job)
        url = signed_result_url(fresh, index, 0.0)
        if url is None:
            raise no_signed_url(fresh, index)
        return url

    async def result_image(self, job: JobRef, index: int = 0) -> Image.Image:
        """Result image `index` as a PIL image (decoded in full)."""
        image = Image.open(io.BytesIO(await self.result_bytes(job, index)))
        image.load()
        return image

    async def download(self, job: JobRef, path: str | Path, index: int = 0) -> Path:
        """Write result image `index` to `path`; returns the path."""
        target = Path(path)
        target.write_bytes(await self.result_bytes(job, index))
        return target
