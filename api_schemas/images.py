"""Turn uploaded bytes into a clean RGB image, or refuse them with an error a person can act on.

The gateway and the GPU worker both call `load_image`: the gateway to refuse a bad upload before
anything is queued, the worker to decode the queued bytes without trusting that the gateway ran.

There is deliberately one entry point and no separate "probe": a truncated or corrupt file only shows
itself when its pixels are decoded, so validating means decoding. The returned image's `size` is the
oriented size, which is all the callers need; nothing else about the upload (format, original mode,
frame count) changes what the service does with it.

Decompression bombs are refused from the header, before any pixel is decoded: `Image.open` only reads
the header, so `ImageLimits.max_pixels` is checked on `im.size` between `open` and `load`. PIL keeps a
guard of its own in the process-wide `Image.MAX_IMAGE_PIXELS` (about 89 million pixels by default; it
warns above that and raises above twice that). This module leaves that global alone, because other
code in the process shares it: our check does not depend on it (it still holds when someone sets it
to None), and when PIL's guard fires first (its error, or its warning where a warnings filter turns
warnings into errors) the refusal is reported as our `image_too_large`. PIL's plain warning is not
silenced either, since `warnings.catch_warnings` swaps process-wide state and is not thread-safe; with
the default limits our check is the stricter one, so that warning only ever concerns an image that
is refused anyway.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageChops

from api_schemas.errors import ErrorCode, InvalidInput, PayloadTooLarge

# PIL's format names, the only plugins `Image.open` may try.
ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED_FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP or TIFF"

_MIB = 1024 * 1024

# EXIF Orientation value -> the transpose that shows the image upright (as `ImageOps.exif_transpose`).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Grey modes wider than 8 bits. PIL's own `convert("L")` clips them to 0..255, which turns 16-bit grey
# white and float grey in [0, 1] black, so they are scaled here instead.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_SIXTEEN_BIT_MAX = 65535


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may be. The size checks apply to the image as displayed (EXIF-rotated).

    `max_pixels` guards against decompression bombs and is checked from the header before decoding.
    `min_side` is one packed latent token (16x16 px). `max_aspect_ratio` is long side / short side:
    the model's resolution buckets stop near 2.33:1, so a longer image would be badly squashed.
    """

    max_bytes: int = 20 * _MIB
    max_pixels: int = 40_000_000
    min_side: int = 16
    max_aspect_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or self.min_side < 1:
            raise ValueError(f"image limits must be positive, got {self}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio is long side / short side, so at least 1, got {self}")


DEFAULT_IMAGE_LIMITS = ImageLimits()


def load_image(
    data: bytes, *, limits: ImageLimits = DEFAULT_IMAGE_LIMITS, label: str = "image 1"
) -> Image.Image:
    """Validate and decode one uploaded image into a fully loaded RGB image.

    Accepts PNG, JPEG, WebP, GIF, BMP and TIFF. The EXIF orientation is applied; an animated image
    gives its first frame; transparency is composited over white; CMYK, palette, 1-bit, grey and
    16-bit or float grey images are converted to 8-bit RGB.

    Args:
        data: The uploaded file's bytes.
        limits: The size limits to enforce.
        label: How error messages name this image, e.g. "image 2" for the second upload.

    Raises:
        PayloadTooLarge: `data` is over `limits.max_bytes` (code "image_file_too_large", HTTP 413).
        InvalidInput: Anything else wrong with the upload (HTTP 422), with code "invalid_image"
            (empty, not an accepted format, truncated or corrupt), "image_too_large" (too many
            pixels), "image_too_small" (a side under `min_side`) or "image_aspect_ratio". The
            message names the image, the problem and the limit; `details` holds the numbers.
    """
    check_byte_size(data, limits, label)
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
            _check_dimensions(im.size, limits, label)
            im.load()
            return normalize_image(im, label=label)
    except InvalidInput:
        raise
    except MemoryError:
        # Says the server is short of memory, not that the upload is wrong: let it surface as a 500.
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _pil_pixel_guard_error(exc, limits, label) from exc
    except Image.UnidentifiedImageError:
        # PIL's message only repeats the buffer's repr; there is nothing in it worth chaining.
        raise InvalidInput(
            f"{label} is not a {_ACCEPTED_FORMATS_TEXT} image.",
            code=ErrorCode.INVALID_IMAGE,
            details={"image": label, "accepted_formats": list(ACCEPTED_FORMATS)},
        ) from None
    except Exception as exc:
        # PIL reports damaged files through many types (OSError, SyntaxError, ValueError, EOFError,
        # struct.error, ...); to the caller they all mean the same thing.
        raise InvalidInput(
            f"{label} is truncated or corrupt and could not be decoded. Re-export or re-upload it.",
            code=ErrorCode.INVALID_IMAGE,
            details={"image": label, "reason": str(exc) or type(exc).__name__},
        ) from exc


def normalize_image(im: Image.Image, *, label: str = "the image") -> Image.Image:
    """The RGB image as displayed: EXIF orientation applied, transparency over white, 8 bits.

    Idempotent: the result carries no orientation tag, so normalizing it again changes nothing.
    """
    rgb = _to_rgb(_apply_orientation(im), label)
    if rgb is im:
        rgb = im.copy()
    # Drop the metadata that would make a second pass rotate the pixels again.
    rgb.info.pop("exif", None)
    rgb.getexif().pop(ExifTags.Base.Orientation, None)
    return rgb


def check_byte_size(data: bytes, limits: ImageLimits, label: str) -> None:
    """Refuse an upload by its byte count alone (413 over the limit, 422 when empty)."""
    size = len(data)
    if size > limits.max_bytes:
        raise PayloadTooLarge(
            f"{label} is {size} bytes; the limit is {limits.max_bytes} bytes "
            f"({limits.max_bytes / _MIB:g} MiB). Compress or downscale it.",
            code=ErrorCode.IMAGE_FILE_TOO_LARGE,
            details={"image": label, "bytes": size, "max_bytes": limits.max_bytes},
        )
    if size == 0:
        raise InvalidInput(
            f"{label} is empty (0 bytes); upload a {_ACCEPTED_FORMATS_TEXT} image.",
            code=ErrorCode.INVALID_IMAGE,
            details={"image": label, "bytes": 0},
        )


def _check_dimensions(size: tuple[int, int], limits: ImageLimits, label: str) -> None:
    # A quarter turn swaps width and height, which none of these checks can tell apart, so they can
    # run on the header's size before decoding and still hold for the EXIF-rotated image.
    width, height = size
    pixels = width * height
    if pixels > limits.max_pixels:
        raise InvalidInput(
            f"{label} has {width}x{height} = {pixels} pixels; the limit is {limits.max_pixels}. "
            "Downscale it and try again.",
            code=ErrorCode.IMAGE_TOO_LARGE,
            details={
                "image": label,
                "width": width,
                "height": height,
                "pixels": pixels,
                "max_pixels": limits.max_pixels,
            },
        )
    short_side, long_side = sorted(size)
    if short_side < limits.min_side:
        raise InvalidInput(
            f"{label} is {width}x{height} pixels; each side must be at least {limits.min_side} pixels.",
            code=ErrorCode.IMAGE_TOO_SMALL,
            details={"image": label, "width": width, "height": height, "min_side": limits.min_side},
        )
    if long_side > limits.max_aspect_ratio * short_side:
        ratio = long_side / short_side
        raise InvalidInput(
            f"{label} is {width}x{height} pixels, an aspect ratio of {ratio:.3g}:1; the limit is "
            f"{limits.max_aspect_ratio:g}:1. Crop it closer to square.",
            code=ErrorCode.IMAGE_ASPECT_RATIO,
            details={
                "image": label,
                "width": width,
                "height": height,
                "aspect_ratio": round(ratio, 3),
                "max_aspect_ratio": limits.max_aspect_ratio,
            },
        )


def _pil_pixel_guard_error(exc: Exception, limits: ImageLimits, label: str) -> InvalidInput:
    # PIL's guard fired before `im.size` could be checked, so the exact size is unknown; name the
    # lower of the two limits, since that is the one the image went over.
    limit = limits.max_pixels
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is not None:
        if isinstance(exc, Image.DecompressionBombError):
            pil_limit *= 2
        limit = min(limit, pil_limit)
    return InvalidInput(
        f"{label} has more pixels than the limit of {limit}. Downscale it and try again.",
        code=ErrorCode.IMAGE_TOO_LARGE,
        details={"image": label, "max_pixels": limit},
    )


def _apply_orientation(im: Image.Image) -> Image.Image:
    # Not `ImageOps.exif_transpose`: after turning the pixels it also rewrites the metadata, which can
    # fail on a malformed EXIF block. The pixels are all we return, and a damaged EXIF block (common
    # from some cameras and editors) should not cost the user the upload: it counts as "upright".
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return im
    method = _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return im if method is None else im.transpose(method)


def _to_rgb(im: Image.Image, label: str) -> Image.Image:
    if im.mode in _WIDE_GREY_MODES:
        grey = _wide_grey_to_8bit(im)
        key = im.info.get("transparency")
        im = Image.merge("LA", (grey, _colour_key_alpha(im, key))) if isinstance(key, int) else grey
    elif im.mode == "La":
        # Premultiplied grey+alpha: PIL converts it to RGBA only by way of LA.
        im = im.convert("LA")
    if im.has_transparency_data:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise InvalidInput(
            f"{label} uses the colour mode {im.mode}, which cannot be converted to RGB. "
            "Save it as 8-bit RGB and try again.",
            code=ErrorCode.INVALID_IMAGE,
            details={"image": label, "mode": im.mode},
        ) from exc


def _wide_grey_to_8bit(im: Image.Image) -> Image.Image:
    """Scale wide grey to 8 bits by the range its bit depth implies, rounding to nearest."""
    if im.mode == "F":
        lo, hi = im.getextrema()
        # Float grey has no fixed range: [0, 1] and [0, 255] are the usual conventions.
        if lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        elif lo >= 0 and hi <= 255:
            lo, hi = 0.0, 255.0
    elif im.mode == "I":
        # 32-bit ints hold 16-bit data (PNG, TIFF) almost always; wider data is stretched to fit.
        lo, hi = im.getextrema()
        if lo >= 0 and hi <= _SIXTEEN_BIT_MAX:
            lo, hi = 0, _SIXTEEN_BIT_MAX
    else:
        lo, hi = 0, _SIXTEEN_BIT_MAX
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        # A flat or non-finite image has no range to stretch; clip it as [0, 1] instead.
        lo, hi = 0.0, 1.0
    scale = 255 / (hi - lo)
    offset = 0.5 - lo * scale
    return im.convert("F").point(lambda v: v * scale + offset).convert("L")


def _colour_key_alpha(im: Image.Image, key: int) -> Image.Image:
    """Alpha that is 0 exactly where a pixel equals the PNG tRNS grey `key`, 255 elsewhere.

    PIL's own transparent conversion compares after clipping wide grey to 8 bits, so it misses.
    """
    wide = im.convert("I")
    # Each side clips to 0 where the pixel is on the other side of `key`, or equal to it.
    above = wide.point(lambda v: v * 255 - key * 255).convert("L")
    below = wide.point(lambda v: v * -255 + key * 255).convert("L")
    return ImageChops.lighter(above, below)
