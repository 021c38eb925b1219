"""The synchronous client: `Client`."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Generator, Iterator, Sequence
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

#: What `wait(on_progress=...)` calls with each update.
ProgressCallback = Callable[[JobProgress], object]


class Client:
    """A client of the DreamOmni2 service (synchronous; see `AsyncClient` for asyncio).

        with Client("http://127.0.0.1:8000", api_key="...") as client:
            job = client.submit("make image 1 use the pattern of image 2", ["bag.png", "dress.png"])
            job = client.wait(job, on_progress=lambda p: print(p.describe()))
            client.download(job, "out.png")

            pair = client.wait(client.feature_mix("a woven straw hat", "a teapot", attribute="material"))
            client.download(pair, "source.png", index=0)
            client.download(pair, "target.png", index=1)

    Args:
        server: the service's base URL; default `$DREAMOMNI2_SERVER`, else http://127.0.0.1:8000.
        api_key: sent as `Authorization: Bearer <key>`; default `$DREAMOMNI2_API_KEY` (none if unset).
        timeout: seconds for each ordinary request (uploads included).
        max_retries: retries of a request that got no answer, or 429/502/503/504, with backoff. Only
            requests safe to resend are resent once they may have reached the service: reads, and
            submissions, which always carry an Idempotency-Key (a fresh one unless you give one).
        http_client: an `httpx.Client` of your own (proxies, TLS, transports); the caller closes it.
    """

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.server = resolve_server(server)
        self.max_retries = max_retries
        self._headers = {"User-Agent": USER_AGENT}
        key = resolve_api_key(api_key)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self._timeout = timeout

    # Lifecycle ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connections (not those of an `http_client` you passed in)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    # Sending ------------------------------------------------------------------------------------------
    def _send(self, request: Prepared) -> httpx.Response:
        """Send with retries; returns a 2xx answer, raises the typed error of anything else."""
        attempt = 0
        while True:
            try:
                response = self._http.request(
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
            time.sleep(backoff(attempt, error))
            attempt += 1

    def _job(self, request: Prepared) -> Job:
        return Job.model_validate_json(self._send(request).content)

    # Jobs ---------------------------------------------------------------------------------------------
    def submit(
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
        """Queue an edit or a generation; returns the job object (status `queued`).

        Args:
            instruction: what to do, in plain words; images are "image 1", "image 2", ...
            images: image 1 (the image to edit) and the references, in order: paths, bytes, PIL
                images or binary files. None at all: a generation from the instruction alone.
            task: `edit` or `generate`; left out: `edit` with at least one image, else `generate`
                (a Feature Mixing pair: `feature_mix`).
            seed, steps, guidance: sampling; left out, the deployment's defaults (seed: random).
            num_images: how many images to sample, 1.. the deployment's cap (default 1); image i uses
                seed + i. Fetch each with `result_bytes(job, index=i)` (`job.results[i].seed`).
            size: (width, height) of a generation (sets the aspect ratio; the area is the model's).
            translate: False samples with the instruction as is, skipping the VLM translator.
            output_format: `png`, `jpeg` or `webp`.
            step_cache: `none`, `first_block` or `taylorseer` (if the deployment allows it).
            loras: registered LoRAs to stack, in order: `"name"`, `"name:0.8"`, `{"name", "scale"}`
                or `LoraChoice`; `service_info().loras` lists them.
            webhook_url, webhook_events: where to POST signed job events (`started`, `progress`,
                `completed`); see `verify_webhook`.
            deadline_s: cancel the job unrun if no worker starts it within this many seconds.
            idempotency_key: the same key and request return the same job instead of a new one;
                the same key with another request raises InvalidInputError (`idempotency_key_reused`).

        Raises:
            InvalidInputError: the request was refused (`code` says why: `too_many_images`,
                `invalid_steps`, `edit_needs_image`, ...), before sending or by the service.
            AuthenticationError, ServiceUnavailableError, DreamOmni2Error: see `dreamomni2.errors`.
            OSError: an image path could not be read.
        """
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
        return self._job(request)

    def feature_mix(
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
        """Queue a Feature Mixing pair (`task=feature_mixing`); returns the job object (status `queued`).

        Two images are generated from one seed: the source from `source_prompt`, and the target from
        `target_prompt` while its attention also sees the source's, so it takes the source's attribute
        (a material, a pose, a hairstyle, a style, an object). Once it succeeded, `result_bytes(job,
        index=0)` is the source and `index=1` the target (`job.results` describes both).

        Args:
            source_prompt: the image that has the attribute ("a woven straw hat on a table").
            target_prompt: the image that takes it ("a teapot").
            attribute: a label kept with the job ("material"); it does not change the images.
            mix_blocks: the transformer blocks that mix: `all` (default), `double`, `single` or `none`
                (then the target is an ordinary generation).
            mix_steps: the fraction of the denoising steps that mix, from the first; 0..1, default 1.
            mix_strength: how much the target attends to the source, 0..1; default 1.
            seed, steps, guidance, size, output_format, webhook_url, webhook_events, deadline_s,
                idempotency_key: as `submit` (`size` applies to both images).

        Raises:
            InvalidInputError: the request was refused (`mixing_needs_prompts`, `invalid_mix_steps`,
                `invalid_mix_strength`, `invalid_steps`, ...), before sending or by the service.
            AuthenticationError, ServiceUnavailableError, DreamOmni2Error: see `dreamomni2.errors`.
        """
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
        return self._job(request)

    def judge(
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
        """Queue a `judge` job: the worker's VLM scores `output`, made from `instruction` and the case's
        `inputs` (in order; image 1 the image to edit for an edit), 1 to 5 for instruction following,
        consistency and absence of distortion. The images go as `inputs..., output` (the output last).
        Once it succeeded, `job.output` is a `JudgeVerdict` (`success`: every score above 3), or
        `unscored` with the raw answer in `job.output_raw`. Raises as `submit`.
        """
        request = prepare_text_job(
            Task.JUDGE,
            instruction=instruction,
            images=[*inputs, output],
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            deadline_s=deadline_s,
            idempotency_key=idempotency_key,
        )
        return self._job(request)

    def mixing_prompts(
        self,
        attribute: str,
        count: int | None = None,
        *,
        webhook_url: str | None = None,
        webhook_events: Sequence[WebhookEvent | str] | None = None,
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a `mixing_prompts` job: the worker's language model writes `count` (default 1) Feature
        Mixing prompt pairs for the `attribute` keyword ("rattan weave"). Once it succeeded,
        `job.output.pairs` holds them (`source_prompt`, `target_prompt`), ready for `feature_mix`.
        Raises as `submit` (`empty_attribute`, `invalid_count`, ...).
        """
        request = prepare_text_job(
            Task.MIXING_PROMPTS,
            attribute=attribute,
            count=count,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            deadline_s=deadline_s,
            idempotency_key=idempotency_key,
        )
        return self._job(request)

    def get(self, job: JobRef) -> Job:
        """The job object now: status, progress, queue position, timings, error or result.

        Raises NotFoundError for an unknown or expired id (or another key's job).
        """
        return self._job(Prepared("GET", job_path(job), idempotent=True))

    def cancel(self, job: JobRef) -> Job:
        """Cancel a job; returns it after the request.

        A queued job ends `canceled` at once; a running one reports `cancel_requested` and stops at
        its next denoising step (`wait` then raises JobCanceledError). Raises ConflictError
        (`job_finished`) for a job that already ended.
        """
        return self._job(Prepared("POST", job_path(job, "/cancel"), idempotent=False))

    def events(
        self, job: JobRef, *, last_event_id: str | None = None, timeout: float | None = None
    ) -> Iterator[JobEvent]:
        """The job's events as they happen, from the first (or after `last_event_id`) to the final one.

        The stream is reopened after a dropped connection, resuming after the last event received,
        so no event is lost or repeated. Raises WaitTimeoutError if `timeout` seconds pass first.
        """
        follower = StreamFollower(
            job_id_of(job), last_event_id=last_event_id, timeout=timeout, max_retries=self.max_retries
        )
        with contextlib.closing(self._follow(follower)) as stream:
            for event in stream:
                if event is not None:
                    yield event

    def wait(
        self,
        job: JobRef,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        queue_poll_s: float = 2.0,
    ) -> Job:
        """Wait for the job to end, following its event stream; returns the succeeded job.

        `on_progress` is called with a `JobProgress` for each step of the way: queued (with the
        queue position, refreshed every `queue_poll_s` seconds while it waits), started, each
        stage's steps (`denoise` 1/N .. N/N), and the end. A dropped stream is resumed where it
        left off.

        Raises:
            JobFailedError: the job failed (`.job.error` says why).
            JobCanceledError: it was canceled, by request or by its deadline.
            WaitTimeoutError: `timeout` seconds passed first (the job goes on).
            NotFoundError: no such job (or it expired).
        """
        job_id = job_id_of(job)
        tracker = ProgressTracker(job_id)
        follower = StreamFollower(
            job_id, timeout=timeout, queue_poll_s=queue_poll_s, max_retries=self.max_retries
        )
        with contextlib.closing(self._follow(follower)) as stream:
            for event in stream:
                if event is not None:
                    update = tracker.from_event(event)
                else:
                    update = tracker.from_job(self.get(job_id))
                if update is not None and on_progress is not None:
                    on_progress(update)
                if event is not None and event.job is not None:
                    return succeeded(event.job)
        # The stream ended without a final event: it was over before (a 204). The job says how it ended.
        return ended(self.get(job_id))

    def _follow(self, follower: StreamFollower) -> Generator[JobEvent | None, None, None]:
        """Events of the stream across reconnects, up to the final one; None when a queued job's stream
        was quiet for `queue_poll_s` (time to poll it)."""
        while not follower.over:
            try:
                yield from self._connection(follower)
            except httpx.ReadTimeout as exc:
                quiet = follower.timed_out()
                if quiet is Quiet.POLL:
                    yield None
                elif quiet is Quiet.DEAD:
                    follower.failed(error_from_transport(exc, self.server))
            except httpx.TransportError as exc:
                follower.failed(error_from_transport(exc, self.server))
            time.sleep(follower.take_delay())

    def _connection(self, follower: StreamFollower) -> Generator[JobEvent, None, None]:
        """The events of one connection to the stream."""
        request = follower.request()
        with self._http.stream(
            request.method,
            self.server + request.path,
            headers={**self._headers, **request.headers},
            timeout=httpx.Timeout(self._timeout, read=follower.read_timeout()),
        ) as response:
            if response.status_code == 204:
                follower.finish()
            elif not response.is_success:
                response.read()
                follower.refused(error_from_response(response))
            else:
                for line in response.iter_lines():
                    event = follower.feed(line)
                    if event is not None:
                        yield event
                    if follower.over:
                        return
                follower.failed(follower.ended_early())

    # Results ------------------------------------------------------------------------------------------
    def result_bytes(self, job: JobRef, index: int = 0) -> bytes:
        """Result image `index` as encoded bytes (in the job's `output_format`).

        `index`: 0, the job's first image (a Feature Mixing pair's source); 1, the second (a pair's
        target); up to num_images - 1 (`job.results[index].seed` is its seed).

        Raises ConflictError (`job_not_finished`) while the job is queued or running,
        JobFailedError / JobCanceledError for a job that ended without a result, NotFoundError for an
        unknown job, an expired result, or an index the job has no image for (`result_index`);
        ValueError for an index no job has.
        """
        try:
            return self._send(Prepared("GET", result_path(job, index), idempotent=True)).content
        except ConflictError as exc:
            raise self._ended_without_result(job, exc) from None

    def _ended_without_result(self, job: JobRef, conflict: ConflictError) -> DreamOmni2Error:
        # The job object says why there is no result (`out_of_memory`, `deadline`, ...): raise that.
        if conflict.code not in ("job_failed", "job_canceled"):
            return conflict
        error: JobError | None = job_error(self.get(job), status=conflict.status)
        return error if error is not None else conflict

    def result_url(self, job: JobRef, index: int = 0, *, min_valid_s: float = 60.0) -> str:
        """An absolute link to result image `index` that downloads without an API key: for an `<img>`
        tag, a browser, or another service that must not hold the key. It is the job object's
        `result.signed_url` (`results[index].signed_url`), working for at least `min_valid_s` more
        seconds (or as long as the deployment's links last, if shorter): the job is read again when the
        object given has no such link. Whoever holds the link can download the image until it expires.

        Raises ConflictError (`job_not_finished`) while the job is queued or running, JobFailedError /
        JobCanceledError for a job that ended without a result, NotFoundError for an unknown job or an
        index it has no image for; ValueError for an index no job has.
        """
        result_path(job, index)  # the index's own check
        if isinstance(job, Job) and (url := signed_result_url(job, index, min_valid_s)):
            return url
        fresh = self.get(job)
        url = signed_result_url(fresh, index, 0.0)  # a fresh link lasts as long as the deployment gives
        if url is None:
            raise no_signed_url(fresh, index)
        return url

    def result_image(self, job: JobRef, index: int = 0) -> Image.Image:
        """Result image `index` as a PIL image (decoded in full); `index` and errors as `result_bytes`."""
        image = Image.open(io.BytesIO(self.result_bytes(job, index)))
        image.load()
        return image

    def download(self, job: JobRef, path: str | Path, index: int = 0) -> Path:
        """Write result image `index` (see `result_bytes`) to `path`, in the job's `output_format`;
        returns the path."""
        target = Path(path)
        target.write_bytes(self.result_bytes(job, index))
        return target
