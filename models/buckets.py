"""Resolution buckets and the output-size rule: which size each input image and the output take.

Kontext was trained on 17 resolutions of about 1 MP; each input image is resized to the one nearest
its aspect ratio, and the output is rescaled to the method's area at its aspect ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

#: The 17 Kontext training resolutions, as (width, height), about 1 MP each.
KONTEXT_BUCKETS: tuple[tuple[int, int], ...] = tuple(PREFERRED_KONTEXT_RESOLUTIONS)
#: Output area the method targets (about 1 MP).
DEFAULT_MAX_AREA = 1024 * 1024
#: Pixels per packed latent token side: 8x VAE downsampling times the 2x2 packing.
TOKEN_PIXELS = 16


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to ``width / height`` (ties go to the smaller bucket)."""
    aspect_ratio = width / height
    _, bucket_w, bucket_h = min((abs(aspect_ratio - w / h), w, h) for w, h in buckets)
    return bucket_w, bucket_h


def resize_to_bucket(image: PIL.Image.Image, buckets: Sequence[tuple[int, int]]) -> PIL.Image.Image:
    """The reference scripts' rule: the bucket nearest the image's raw aspect ratio, one Lanczos resize.

    Unlike `FluxKontextPipeline`'s own auto-resize, the raw width and height pick the bucket (not the
    size floored to 16 px first); for about a third of 4:5 portraits the two rules disagree. An image
    already at its bucket's size comes back unchanged.
    """
    width, height = nearest_bucket(image.width, image.height, buckets)
    if image.size == (width, height):
        return image
    return image.resize((width, height), PIL.Image.Resampling.LANCZOS)


def scale_buckets(buckets: Sequence[tuple[int, int]], scale: float) -> tuple[tuple[int, int], ...]:
    """Buckets shrunk by ``scale``, floored to whole tokens (the tiny preset's smaller resolutions)."""
    scaled = []
    for w, h in buckets:
        sw = max(TOKEN_PIXELS, int(w * scale) // TOKEN_PIXELS * TOKEN_PIXELS)
        sh = max(TOKEN_PIXELS, int(h * scale) // TOKEN_PIXELS * TOKEN_PIXELS)
        scaled.append((sw, sh))
    return tuple(scaled)


def output_size(width: int, height: int, max_area: int, multiple_of: int = TOKEN_PIXELS) -> tuple[int, int]:
    """The method's output-size rule: rescale to ``max_area`` at the same aspect, floor to ``multiple_of``."""
    aspect_ratio = width / height
    out_w = round((max_area * aspect_ratio) ** 0.5) // multiple_of * multiple_of
    out_h = round((max_area / aspect_ratio) ** 0.5) // multiple_of * multiple_of
    return out_w, out_h
