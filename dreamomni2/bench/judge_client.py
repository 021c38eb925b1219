"""`bench --judge-url`: an external OpenAI-compatible chat-completions endpoint with vision as the judge
(a larger VLM served by vLLM or SGLang, or a hosted one), asked with our judge prompt
(`api_schemas.text_tasks.JUDGE_PROMPT`, the one the worker's judge reads).

The case's input images, then its output, go as `data:` URIs in `image_url` content parts, then the
prompt; `response_format` asks for the verdict's JSON schema (vLLM, SGLang and OpenAI decode under
it). The answer is read by the worker judge's own parser: one without the three scores (1-5) and a
reason is recorded as unscored with its raw text, never guessed at.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from api_schemas.text_tasks import judge_answer_schema, judge_prompt, parse_judge_answer
from dreamomni2._core import backoff
from dreamomni2.bench.discovery import BenchCase
from dreamomni2.bench.judging import verdict_record
from dreamomni2.bench.report import data_uri
from dreamomni2.errors import DreamOmni2Error

#: Images go to the judge at most this many pixels a side (hosted endpoints cap request sizes).
JUDGE_IMAGE_SIDE = 1024
JUDGE_API_KEY_ENV = "DREAMOMNI2_JUDGE_API_KEY"
#: The longest answer asked for: three scores and a one-line reason fit in far fewer tokens.
JUDGE_MAX_TOKENS = 256


class JudgeError(DreamOmni2Error):
    """The external judge gave no answer (unreachable, an error status, a body that is not a
    chat completion). The case is recorded without a verdict and judged again by the next run."""


def chat_completions_url(url: str) -> str:
    """The endpoint: `URL` as given if it ends in /chat/completions, else `URL/chat/completions`
    (`http://host:8000/v1` is vLLM's and SGLang's base)."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


def judge_messages(case: BenchCase, output: Path) -> list[dict[str, Any]]:
    """The chat: each input image in order, then the output, as data URIs; then our judge prompt."""
    parts: list[dict[str, Any]] = [_image_part(path) for path in [*case.images, output]]
    parts.append({"type": "text", "text": judge_prompt(case.instruction, case.image_count)})
    return [{"role": "user", "content": parts}]


def _image_part(path: Path) -> dict[str, Any]:
    uri = data_uri(path, JUDGE_IMAGE_SIDE)
    if uri is None:
        raise OSError(f"cannot read the image {path} to send it to the judge")
    return {"type": "image_url", "image_url": {"url": uri}}


def answer_text(body: object) -> str:
    """The assistant's text in a chat completion (`choices[0].message.content`, a string or a list of
    text parts); raises ValueError for anything else."""
    try:
        content = body["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ValueError("choices[0].message.content is not text")
    return content


class ChatJudge:
    """The judge at an OpenAI-compatible endpoint; one instance serves every case of a run."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 180.0,
        max_retries: int = 2,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = chat_completions_url(url)
        self.model = model
        self.max_retries = max_retries
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._owns_http = http_client is None
        self._model_lock = asyncio.Lock()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _model(self) -> str:
        """The model to ask: as given, else the first the endpoint lists (`GET .../models`)."""
        async with self._model_lock:
            if self.model is None:
                base = self.url.removesuffix("/chat/completions")
                body = (await self._request("GET", f"{base}/models")).json()
                try:
                    self.model = str(body["data"][0]["id"])
                except (KeyError, IndexError, TypeError):
                    raise JudgeError(f"{base}/models lists no model: name one with --judge-model",
                                     code="judge_unavailable") from None  # fmt: skip
            return self.model

    async def _request(self, method: str, url: str, payload: dict[str, Any] | None = None) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, url, json=payload, headers=self._headers)
            except httpx.HTTPError as exc:
                error = JudgeError(f"the judge at {url} did not answer: {exc}", code="judge_unavailable")
            else:
                if response.is_success:
                    return response
                error = JudgeError(f"the judge at {url} answered {response.status_code}: "
                                   f"{response.text[:300]}", code="judge_unavailable",
                                   status=response.status_code)  # fmt: skip
                if response.status_code not in (429, 500, 502, 503, 504):
                    raise error
            if attempt >= self.max_retries:
                raise error
            await asyncio.sleep(backoff(attempt))
            attempt += 1

    async def __call__(self, case: BenchCase, output: Path, record: dict[str, Any]) -> dict[str, Any]:
        """The verdict on one case (`judging.verdict_record`); raises JudgeError without an answer."""
        model = await self._model()
        # No pattern on the reason: endpoints' JSON-schema support lacks the Unicode classes it uses.
        schema = {"name": "judge_verdict", "schema": judge_answer_schema(pattern=None), "strict": True}
        payload = {
            "model": model,
            "messages": judge_messages(case, output),
            "temperature": 0,
            "max_tokens": JUDGE_MAX_TOKENS,
            "response_format": {"type": "json_schema", "json_schema": schema},
        }
        response = await self._request("POST", self.url, payload)
        try:
            raw = answer_text(response.json())
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise JudgeError(f"the judge at {self.url} sent no chat completion ({exc})",
                             code="judge_unavailable") from None  # fmt: skip
        return verdict_record(parse_judge_answer(raw), raw, "url", model=model)
