"""Typed dependencies of the routes: the service, the caller, the parsed submission."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials

from app.auth import BEARER
from app.headers import CancelAfter
from app.service import JobService, Submission
from app.submission import read_submission


def get_service(request: Request) -> JobService:
    return request.app.state.jobs


def get_owner(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
) -> str:
    return request.app.state.keys.owner(credentials)


def get_base_url(request: Request) -> str:
    """The base URL the request came to, for the absolute links of its answer. Its scheme follows
    `X-Forwarded-Proto` only from the proxies uvicorn trusts (`FORWARDED_ALLOW_IPS`, loopback by
    default); DREAMOMNI2_PUBLIC_URL, where set, replaces it (`JobService.links_at`)."""
    return str(request.base_url)


Service = Annotated[JobService, Depends(get_service)]
Owner = Annotated[str, Depends(get_owner)]
BaseUrl = Annotated[str, Depends(get_base_url)]


async def get_submission(request: Request, service: Service, cancel_after: CancelAfter) -> Submission:
    submission = await read_submission(request, service.limits)
    submission.cancel_after_s = cancel_after
    return submission


SubmissionBody = Annotated[Submission, Depends(get_submission)]
