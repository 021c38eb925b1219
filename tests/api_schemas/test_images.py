"""Tests for `api_schemas.images`: every image is built in memory with PIL or crafted byte by byte."""

from __future__ import annotations

import functools
import io
import random
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image, ImageFile, ImageOps, PngImagePlugin

from api_schemas.errors import InvalidInput, PayloadTooLarge
from api_schemas.images import ACCEPTED_FORMATS, DEFAULT_IMAGE_LIMITS, ImageLimits, load_image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def assert_colour(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 0) -> None:
    assert len(actual) == len(expected), (actual, expected)
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


def refusal(data: bytes, **kwargs: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        load_image(data, **kwargs)
    return caught.value


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def crafted_png(width: int, height: int, *, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


@functools.cache
def bomb_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG: some kilobytes that decode to width * height bytes in PIL."""
    row = bytes(1 + (width + 7) // 8)  # filter type 0, then the packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * min(1000, height - top)) for top in range(0, height, 1000)]
    parts.append(compressor.flush())
    return crafted_png(width, height, bit_depth=1, colour_type=0, idat=b"".join(parts))


def noise_png(size: tuple[int, int] = (64, 64)) -> bytes:
    pixels = random.Random(0).randbytes(size[0] * size[1] * 3)
    return encode(Image.frombytes("RGB", size, pixels), "PNG")


def left_right(size: tuple[int, int], left: tuple[int, ...], right: tuple[int, ...]) -> Image.Image:
    im = Image.new("RGB", size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


# --- accepted formats -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [
        ("PNG", {}, 0),
        ("JPEG", {"quality": 95}, 4),
        ("WEBP", {"quality": 95}, 8),
        ("GIF", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
    ],
)
def test_accepts_each_format_as_a_detached_rgb_image(
    fmt: str, params: dict[str, Any], tolerance: int
) -> None:
    data = encode(Image.new("RGB", (48, 32), (200, 40, 40)), fmt, **params)

    out = load_image(data)

    assert out.mode == "RGB"
    assert out.size == (48, 32)
    assert_colour(out.getpixel((24, 16)), (200, 40, 40), tolerance)
    # A plain, loaded image: nothing refers back to the upload's buffer.
    assert not isinstance(out, ImageFile.ImageFile)


def test_accepted_formats_are_the_six_documented_ones() -> None:
    assert set(ACCEPTED_FORMATS) == {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}


# --- orientation ---------------------------------------------------------------------------------


def test_exif_orientation_6_turns_the_image_upright() -> None:
    stored = left_right((40, 20), RED, BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned a quarter clockwise
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())

    out = load_image(data)

    assert out.size == (20, 40)
    # Displayed upright, the stored left edge is at the top.
    assert_colour(out.getpixel((10, 5)), RED, 4)
    assert_colour(out.getpixel((10, 35)), BLUE, 4)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert out.tobytes() == reference.tobytes()


def test_orientation_does_not_decide_the_size_checks() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(Image.new("RGB", (64, 16), RED), "PNG", exif=exif.tobytes())

    out = load_image(data)

    assert out.size == (16, 64)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_a_damaged_exif_block_leaves_the_image_as_stored() -> None:
    jpeg = encode(left_right((40, 20), RED, BLUE), "JPEG", quality=95)
    junk = b"Exif\x00\x00MM\x00*\xff\xff\xff\xff garbage"
    app1 = b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk
    data = jpeg[:2] + app1 + jpeg[2:]

    out = load_image(data)

    assert out.size == (40, 20)


def test_an_orientation_that_is_not_a_number_is_ignored() -> None:
    # PIL's EXIF writer coerces Orientation to a number, so write the block by hand: ASCII "6".
    exif = b"MM\x00*\x00\x00\x00\x08\x00\x01" + struct.pack(">HHI4s", 0x0112, 2, 2, b"6") + bytes(4)
    data = encode(Image.new("RGB", (40, 20), RED), "PNG", exif=exif)

    assert load_image(data).size == (40, 20)


def test_exif_that_cannot_be_read_at_all_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(self: Image.Image) -> Image.Exif:
        raise SyntaxError("broken EXIF")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "getexif", unreadable)

    assert load_image(encode(Image.new("RGB", (40, 20), RED), "PNG")).size == (40, 20)


# --- colour modes --------------------------------------------------------------------------------


def test_rgba_is_composited_over_white() -> None:
    im = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 128))

    out = load_image(encode(im, "PNG"))

    assert out.getpixel((0, 0)) == WHITE
    assert_colour(out.getpixel((1, 0)), (255, 127, 127), 1)
    assert out.getpixel((5, 5)) == RED


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_white_where_transparent(fmt: str) -> None:
    im = Image.new("P", (32, 32), 1)
    im.putpalette([0, 0, 0, *RED, *BLUE])
    im.putpixel((0, 0), 0)

    out = load_image(encode(im, fmt, transparency=0))

    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((5, 5)) == RED


def test_palette_without_transparency() -> None:
    im = Image.new("P", (32, 32), 2)
    im.putpalette([0, 0, 0, *RED, *BLUE])

    assert load_image(encode(im, "PNG")).getpixel((5, 5)) == BLUE


def test_grey_with_alpha_is_composited_over_white() -> None:
    im = Image.new("LA", (32, 32), (0, 255))
    im.putpixel((0, 0), (0, 0))

    out = load_image(encode(im, "PNG"))

    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((5, 5)) == BLACK


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)

    out = load_image(data)

    assert out.mode == "RGB"
    assert_colour(out.getpixel((16, 16)), RED, 4)


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_16_bit_grey_is_scaled_not_clipped(mode: str, fmt: str) -> None:
    im = Image.new(mode, (3, 16))
    for x, value in enumerate((0, 32768, 65535)):
        for y in range(16):
            im.putpixel((x, y), value)
    im = im.resize((48, 16), Image.Resampling.NEAREST)

    out = load_image(encode(im, fmt))

    assert out.getpixel((0, 0)) == BLACK
    assert out.getpixel((24, 0)) == (128, 128, 128)
    assert out.getpixel((47, 0)) == WHITE


def test_16_bit_grey_transparency_key_is_white_only_where_it_matches() -> None:
    im = Image.new("I;16", (32, 32), 1001)
    im.putpixel((0, 0), 1000)

    out = load_image(encode(im, "PNG", transparency=1000))

    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == (4, 4, 4)


def test_16_bit_rgb_png_keeps_its_colours() -> None:
    # PIL has no 16-bit RGB mode to save from, so write the PNG by hand: colour type 2, 16 bits.
    row = b"\x00" + bytes.fromhex("8000 4000 ffff") * 16
    data = crafted_png(16, 16, bit_depth=16, colour_type=2, idat=zlib.compress(row * 16))

    assert load_image(data).getpixel((3, 3)) == (128, 64, 255)


def test_float_grey_tiff_in_the_unit_range_is_scaled() -> None:
    data = encode(Image.new("F", (32, 32), 0.5), "TIFF")

    assert load_image(data).getpixel((3, 3)) == (128, 128, 128)


def test_one_bit_image_becomes_black_and_white_rgb() -> None:
    im = Image.new("1", (32, 32), 1)
    im.putpixel((0, 0), 0)

    out = load_image(encode(im, "PNG"))

    assert out.getpixel((0, 0)) == BLACK
    assert out.getpixel((5, 5)) == WHITE


def test_grey_becomes_rgb() -> None:
    assert load_image(encode(Image.new("L", (32, 32), 77), "PNG")).getpixel((3, 3)) == (77, 77, 77)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_gives_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, GREEN, BLUE)]
    params: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **params)
    assert Image.open(io.BytesIO(data)).n_frames == 3

    assert load_image(data).getpixel((16, 16)) == RED


# --- refusals: not an image ----------------------------------------------------------------------


def test_zero_bytes_are_refused() -> None:
    error = refusal(b"")

    assert error.code == "invalid_image"
    assert "empty" in error.message


def test_random_bytes_are_refused_naming_the_accepted_formats() -> None:
    error = refusal(random.Random(1).randbytes(4096))

    assert error.code == "invalid_image"
    assert error.message == "image 1 is not a PNG, JPEG, WebP, GIF, BMP or TIFF image."
    assert error.details["accepted_formats"] == list(ACCEPTED_FORMATS)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "PCX", "TGA"])
def test_other_image_formats_are_refused(fmt: str) -> None:
    error = refusal(encode(Image.new("RGB", (32, 32), RED), fmt))

    assert error.code == "invalid_image"
    assert "PNG, JPEG, WebP, GIF, BMP or TIFF" in error.message


def test_png_truncated_in_the_middle_is_refused() -> None:
    data = noise_png()

    error = refusal(data[: len(data) // 2])

    assert error.code == "invalid_image"
    assert "truncated or corrupt" in error.message
    assert error.details["reason"]


def test_jpeg_truncated_in_the_middle_is_refused() -> None:
    data = encode(Image.open(io.BytesIO(noise_png())), "JPEG")

    assert refusal(data[: len(data) // 2]).code == "invalid_image"


@pytest.mark.parametrize("warning_action", ["ignore", "error"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_damaged_files_only_ever_raise_invalid_input(fmt: str, warning_action: str) -> None:
    # PIL raises a zoo of exception types on damaged files, and warns about damaged metadata; none of
    # it may get past load_image, even where warnings are turned into errors.
    good = encode(Image.open(io.BytesIO(noise_png((32, 32)))), fmt)
    rng = random.Random(fmt)
    with warnings.catch_warnings():
        warnings.simplefilter(warning_action)
        for _ in range(150):
            damaged = bytearray(good[: rng.randrange(len(good) + 1)])
            for _ in range(rng.randrange(4)):
                if damaged:
                    damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            try:
                out = load_image(bytes(damaged))
            except InvalidInput as error:
                assert 400 <= error.http_status < 500
            else:
                assert out.mode == "RGB"


# --- refusals: size ------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_from_its_header() -> None:
    data = bomb_png(20_000, 20_000)  # 400 million pixels in a file this small
    assert len(data) < 200_000

    started = time.perf_counter()
    error = refusal(data)
    elapsed = time.perf_counter() - started

    assert elapsed < 1.0  # decoding would take seconds and 400 MB
    assert error.code == "image_too_large"
    assert "40000000" in error.message
    assert error.details["max_pixels"] == 40_000_000


def test_too_many_pixels_names_the_size_and_the_limit() -> None:
    error = refusal(bomb_png(7_000, 7_000))

    assert error.code == "image_too_large"
    assert error.message.startswith("image 1 has 7000x7000 = 49000000 pixels; the limit is 40000000.")
    assert error.details == {
        "image": "image 1",
        "width": 7000,
        "height": 7000,
        "pixels": 49_000_000,
        "max_pixels": 40_000_000,
    }


def test_pil_bomb_warning_turned_error_is_still_an_invalid_input() -> None:
    # 100 million pixels: over PIL's warning threshold, under its hard error.
    data = bomb_png(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        error = refusal(data)

    assert error.code == "image_too_large"
    assert "40000000" in error.message


def test_pixel_limit_holds_when_pil_guard_is_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    error = refusal(bomb_png(20_000, 20_000))

    assert error.code == "image_too_large"
    assert error.details["pixels"] == 400_000_000


def test_too_many_bytes_is_payload_too_large() -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(DEFAULT_IMAGE_LIMITS.max_bytes)

    with pytest.raises(PayloadTooLarge) as caught:
        load_image(data)

    error = caught.value
    assert error.http_status == 413
    assert error.code == "image_file_too_large"
    assert error.details["max_bytes"] == 20 * 1024 * 1024
    assert "20 MiB" in error.message


def test_one_pixel_image_is_too_small() -> None:
    error = refusal(encode(Image.new("RGB", (1, 1)), "PNG"))

    assert error.code == "image_too_small"
    assert "at least 16 pixels" in error.message
    assert error.details["min_side"] == 16


@pytest.mark.parametrize("size", [(1000, 16), (16, 1000)])
def test_extreme_aspect_ratio_is_refused(size: tuple[int, int]) -> None:
    error = refusal(encode(Image.new("RGB", size), "PNG"))

    assert error.code == "image_aspect_ratio"
    assert "62.5:1" in error.message
    assert "the limit is 4:1" in error.message
    assert error.details["max_aspect_ratio"] == 4.0


def test_an_image_exactly_at_every_limit_is_accepted() -> None:
    data = encode(Image.new("RGB", (64, 16), RED), "PNG")
    limits = ImageLimits(max_bytes=len(data), max_pixels=64 * 16, min_side=16, max_aspect_ratio=4.0)

    assert load_image(data, limits=limits).size == (64, 16)
    assert load_image(data).size == (64, 16)


def test_one_past_each_limit_is_refused() -> None:
    data = encode(Image.new("RGB", (64, 16), RED), "PNG")
    at = {"max_bytes": len(data), "max_pixels": 64 * 16, "min_side": 16, "max_aspect_ratio": 4.0}
    past = {"max_bytes": len(data) - 1, "max_pixels": 64 * 16 - 1, "min_side": 17, "max_aspect_ratio": 3.99}
    for name in at:
        with pytest.raises(InvalidInput):
            load_image(data, limits=ImageLimits(**{**at, name: past[name]}))


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"max_pixels": 0}, {"min_side": 0}, {"max_aspect_ratio": 0.5}],
)
def test_nonsense_limits_are_a_programming_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ImageLimits(**kwargs)


# --- every refusal -------------------------------------------------------------------------------

REFUSED_UPLOADS: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "not an image": lambda: b"hello, world" * 10,
    "unsupported format": lambda: encode(Image.new("RGB", (32, 32)), "PPM"),
    "truncated": lambda: noise_png()[:2000],
    "bomb": lambda: bomb_png(20_000, 20_000),
    "too many pixels": lambda: bomb_png(7_000, 7_000),
    "too small": lambda: encode(Image.new("RGB", (8, 32)), "PNG"),
    "aspect ratio": lambda: encode(Image.new("RGB", (1000, 16)), "PNG"),
    "too many bytes": lambda: bytes(DEFAULT_IMAGE_LIMITS.max_bytes + 1),
}


@pytest.mark.parametrize("case", REFUSED_UPLOADS)
def test_every_refusal_names_the_image_and_is_a_4xx(case: str) -> None:
    error = refusal(REFUSED_UPLOADS[case](), label="image 2")

    assert error.message.startswith("image 2 ")
    assert "image 1" not in error.message
    assert error.details["image"] == "image 2"
    assert 400 <= error.http_status < 500
    assert error.code not in ("invalid_input", "payload_too_large")  # always the specific code
    assert error.to_dict()["code"] == error.code
