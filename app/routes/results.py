"""`/v1/results`: a result image through its signed link, with no API key (an `<img>` tag, a webhook
receiver, another service). The link is the job object's `result.signed_url` (`workers.result_links`)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Response

from api_schemas.api import MAX_RESULTS, ErrorEnvelope
from app.dependencies import Service

results_router = APIRouter(prefix="/v1/results", tags=["results"])

#: The largest `expires` taken (the year 5138): far past any link's, and a number every clock can hold.
MAX_EXPIRES = 10**11
#: Longest a browser may keep a downloaded image (never past the link's expiry).
MAX_CACHE_S = 3600


def _envelope(description: str) -> dict:
    return {"model": ErrorEnvelope, "description": description}


@results_router.get(
    "/{job_id}",
    operation_id="get_signed_result",
    summary="Download a result image through its signed link (no API key)",
    response_class=Response,  # the 200 is an image
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "The image."},
        403: _envelope(
            "`link_invalid`: the signature does not match the job id, index and expiry (a link this "
            "service did not issue, or one with a part changed). The same answer whether the job exists "
            "or not."
        ),
        404: _envelope("A genuine link, but the job or its image has expired since (DREAMOMNI2_JOB_TTL_S)."),
        410: _envelope("`link_expired`: a genuine link past `expires`; read the job for a fresh one."),
        422: _envelope("A parameter is missing or malformed (`invalid_request`)."),
        503: _envelope("Redis is unreachable."),
    },
)
def get_signed_result(
    job_id: str,
    service: Service,
    expires: Annotated[
        int, Query(ge=0, le=MAX_EXPIRES, description="When the link stops working, in Unix seconds.")
    ],
    signature: Annotated[
        str, Query(min_length=1, max_length=128, description="The link's signature (base64url).")
    ],
    index: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_RESULTS - 1,
            description="Which image: 0 the job's first (a Feature Mixing pair's source), 1 the second "
            "(a pair's target), up to num_images - 1.",
        ),
    ] = 0,
) -> Response:
    """The image bytes of a signed link (`result.signed_url` of the job object, also in webhooks),
    without an `Authorization` header: whoever holds the link may download the image until it expires.
    The signature is checked before the job is read."""
    data, content_type = service.signed_result(job_id, index, expires, signature)
    max_age = max(0, min(MAX_CACHE_S, expires - int(time.time())))
    headers = {
        "Cache-Control": f"private, max-age={max_age}",
        # An <img> on any site may show it, including pages that require cross-origin opt-in (COEP).
        "Cross-Origin-Resource-Policy": "cross-origin",
        "X-Content-Type-Options": "nosniff",
    }
    return Response(content=data, media_type=content_type, headers=headers)
