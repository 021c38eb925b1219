"""Live previews: a small picture of the image a job is heading for, made without the VAE.

At a denoising step the current estimate of the final latents is flow matching's
``x0 = x_t - sigma_t * v`` (`DreamOmni2Pipeline.denoised_latents`). A fixed linear map takes each
latent pixel's 16 channels to RGB, so the picture has one pixel per 8x8 of the output (128x128 for
1024x1024), and it goes out as a small JPEG data URI (a few KB) on the job's progress events.
"""

from __future__ import annotations

import base64
import functools
import io

import PIL.Image
import torch

#: FLUX.1's latent-to-RGB projection, one row per latent channel (R, G, B), and its bias: the public
#: constants ComfyUI's latent previewer uses for FLUX.1 (`comfy/latent_formats.py`, class `Flux`). They
#: apply to the latents as the transformer sees them, ``(z - shift_factor) * scaling_factor``, and give
#: RGB in about [-1, 1]. Random (tiny) weights make them meaningless, not wrong.
FLUX_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS: tuple[float, float, float] = (-0.0329, -0.0718, -0.0851)
#: Longest side of a preview in pixels: a 1 MP output previews at its latent size (128x128 at
#: 1024x1024, 196x84 at 1568x672); only a Feature Mixing pair's two pictures side by side may shrink.
PREVIEW_MAX_SIDE = 256
#: JPEG quality: encoding a 128x128 picture takes about 0.1 ms (WebP: 0.3-2.5 ms for a similar size).
PREVIEW_QUALITY = 60
PREVIEW_CONTENT_TYPE = "image/jpeg"


def preview_due(step: int, every: int) -> bool:
    """Whether denoising step `step` (1-based) carries a preview, with one every `every` steps (0: none)."""
    return every > 0 and step % every == 0


@functools.cache
def _projection(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection's weight ``(3, 16)`` and bias on `device`, made once per device."""
    weight = torch.tensor(FLUX_LATENT_RGB_FACTORS, dtype=torch.float32).T.contiguous()
    bias = torch.tensor(FLUX_LATENT_RGB_BIAS, dtype=torch.float32)
    return weight.to(device), bias.to(device)


@torch.no_grad()
def latent_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Unpacked FLUX latents ``(batch, 16, h, w)`` as one ``uint8`` RGB picture ``(h, batch * w, 3)`` on
    the CPU, the batch side by side (a Feature Mixing pair: source, then target).

    The projection runs where the latents are; only the ``uint8`` pixels (48 KiB at 128x128) are copied
    to the host. Nothing of it keeps a reference to `latents`.
    """
    if latents.ndim != 4 or latents.shape[1] != len(FLUX_LATENT_RGB_FACTORS):
        raise ValueError(
            f"latent_rgb takes unpacked FLUX latents (batch, {len(FLUX_LATENT_RGB_FACTORS)}, h, w); got "
            f"{tuple(latents.shape)}: unpack them first (`DreamOmni2Pipeline.denoised_latents`)."
        )
    weight, bias = _projection(latents.device)
    rgb = torch.nn.functional.linear(latents.detach().float().movedim(1, -1), weight, bias)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    batch, height, width, _ = pixels.shape
    return pixels.permute(1, 0, 2, 3).reshape(height, batch * width, 3).cpu()


def preview_image(latents: torch.Tensor) -> PIL.Image.Image:
    """The preview picture of unpacked latents (`latent_rgb`), shrunk to `PREVIEW_MAX_SIDE` if larger."""
    image = PIL.Image.fromarray(latent_rgb(latents).numpy())
    image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE), PIL.Image.Resampling.BILINEAR)
    return image


def encode_preview(image: PIL.Image.Image) -> str:
    """`image` as a ``data:image/jpeg;base64,...`` URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    return f"data:{PREVIEW_CONTENT_TYPE};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def render_preview(latents: torch.Tensor) -> str:
    """Unpacked FLUX latents as a preview data URI (a few KB at 1 MP; about 0.5 KB for the tiny preset)."""
    return encode_preview(preview_image(latents))
