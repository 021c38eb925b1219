"""Images as the client takes them (paths, bytes, PIL images, open files) and as they are uploaded."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

#: What `submit` accepts for an image: a path (str or os.PathLike), encoded bytes (PNG, JPEG, WebP,
#: GIF, BMP or TIFF, as read from a file), a PIL image (sent as PNG, losslessly) or an open binary file.
ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | BinaryIO

# Leading bytes of the formats the service accepts, to label an upload (the service decodes it anyway).
_SIGNATURES: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"GIF87a", "image/gif", "gif"),
    (b"GIF89a", "image/gif", "gif"),
    (b"BM", "image/bmp", "bmp"),
    (b"II*\x00", "image/tiff", "tiff"),
    (b"MM\x00*", "image/tiff", "tiff"),
)


@dataclass(frozen=True)
class Upload:
    """One image as it goes into the multipart body."""

    filename: str
    data: bytes
    content_type: str

    def part(self) -> tuple[str, tuple[str, bytes, str]]:
        """The `images` part in httpx's `files=` form."""
        return ("images", (self.filename, self.data, self.content_type))


def sniff(data: bytes) -> tuple[str, str]:
    """The content type and file extension `data` starts like; `application/octet-stream` if none."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    for signature, content_type, extension in _SIGNATURES:
        if data.startswith(signature):
            return content_type, extension
    return "application/octet-stream", "bin"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")
    except (OSError, ValueError):
        # Modes PNG cannot hold (CMYK, YCbCr, ...): the service works in RGB anyway.
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def to_upload(image: ImageInput, number: int) -> Upload:
    """Read or encode image `number` (1-based) for upload; raises OSError for a path that cannot be read.

    A `str` is always a path (never base64 or a URL), so a typo fails here, naming the file.
    """
    if isinstance(image, Image.Image):
        return Upload(f"image-{number}.png", _png(image), "image/png")
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        data = path.read_bytes()
        return Upload(path.name, data, sniff(data)[0])
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError(f"image {number}: the file must be opened in binary mode ('rb').")
    else:
        raise TypeError(
            f"image {number}: expected a path, bytes, a PIL image or a binary file, "
            f"not {type(image).__name__}."
        )
    content_type, extension = sniff(data)
    return Upload(f"image-{number}.{extension}", data, content_type)
