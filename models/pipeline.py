"""DreamOmni2 on diffusers: FLUX.1 Kontext conditioned on any number of input images.

Each input image is encoded on its own and its packed tokens get RoPE ids ``(n, row, col + offset_n)``:
``n`` is the image's 1-based position in the request (the *index encoding*) and ``offset_n`` the
cumulative packed width of the images before it (the *position offset*). Image 1 therefore gets the
ids stock Kontext gives its single conditioning image, so one image and no LoRA is stock Kontext.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from api_schemas.images import normalize_image
from models.buckets import DEFAULT_MAX_AREA, KONTEXT_BUCKETS, nearest_bucket, output_size
from models.modes import Stage
from models.pairs import FeatureMixingPipelineMixin
from models.stages import stage


def encode_reference_ids(
    token_sizes: Sequence[tuple[int, int]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """RoPE position ids of the input images' packed tokens, concatenated in input order.

    ``token_sizes`` holds each image's ``(rows, cols)`` in packed tokens. Image n (1-based) gets
    ``(n, r, c + sum of cols of images before it)``, row-major, exactly as its tokens are packed.
    """
    ids = []
    col_offset = 0
    for index, (rows, cols) in enumerate(token_sizes, start=1):
        grid = torch.zeros(rows, cols, 3)
        grid[..., 0] = index
        grid[..., 1] = torch.arange(rows)[:, None]
        grid[..., 2] = torch.arange(cols)[None, :] + col_offset
        ids.append(grid.reshape(rows * cols, 3))
        col_offset += cols
    if not ids:
        return torch.zeros(0, 3, device=device, dtype=dtype)
    return torch.cat(ids).to(device=device, dtype=dtype)


@dataclass
class DreamOmni2PipelineOutput(FluxPipelineOutput):
    """Images plus the wall time of each stage of the call, in seconds."""

    timings: dict[str, float] = field(default_factory=dict)


class DreamOmni2Pipeline(FeatureMixingPipelineMixin, FluxKontextPipeline):
    r"""FLUX.1 Kontext with DreamOmni2's multi-image index + position-offset encoding.

    Loads like its parent (``DreamOmni2Pipeline.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev")``
    or any folder in that layout) and takes LoRAs through ``load_lora_weights``. ``__call__`` takes
    ``images=[PIL.Image, ...]`` (zero or more, in the user's order) instead of the parent's single
    ``image``; everything else works as in ``FluxKontextPipeline``. IP-adapters are not supported.
    ``generate_pair`` samples a Feature Mixing pair (`models.pairs`).
    """

    #: Output area when a call names none: about 1 MP, as the method.
    default_max_area: int = DEFAULT_MAX_AREA

    #: Where the pipeline computes, when the engine keeps some of its models in host memory between
    #: stages (diffusers would otherwise infer it from wherever the first model happens to be).
    compute_device: torch.device | None = None

    #: What ``callback_on_step_end`` may ask for: the parent's, and the step's velocity.
    _callback_tensor_inputs = ["latents", "prompt_embeds", "noise_pred"]

    @property
    def _execution_device(self) -> torch.device:
        return self.compute_device or super()._execution_device

    def _sync(self, device: torch.device) -> float:
        # Asynchronous CUDA kernels would make stage timings meaningless without a sync.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def begin_call(
        self, guidance_scale: float, joint_attention_kwargs: dict[str, Any] | None, size: tuple[int, int]
    ) -> None:
        """Reset the per-call state a sampling call and its callbacks read (guidance, interruption, the
        output's ``(height, width)``)."""
        self._output_size = size
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs or {}
        self._current_timestep = None
        self._interrupt = False

    def preprocess_images(
        self, images: Sequence[PIL.Image.Image], buckets: Sequence[tuple[int, int]] | None
    ) -> list[torch.Tensor]:
        """Each image on its own: RGB over white, EXIF-oriented, resized to its nearest bucket, to [-1, 1]."""
        multiple_of = self.vae_scale_factor * 2
        tensors = []
        for image in images:
            image = normalize_image(image)
            # Like FluxKontextPipeline, take the aspect ratio of the size floored to whole tokens.
            height, width = self.image_processor.get_default_height_width(image)
            if buckets:
                width, height = nearest_bucket(width, height, buckets)
            width = width // multiple_of * multiple_of
            height = height // multiple_of * multiple_of
            image = self.image_processor.resize(image, height, width)
            tensors.append(self.image_processor.preprocess(image, height, width))
        return tensors

    def prepare_image_latents(
        self,
        images: Sequence[torch.Tensor],
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Packed latents of all input images, concatenated along the sequence, and their position ids."""
        if not images:
            return None, None
        num_channels_latents = self.transformer.config.in_channels // 4
        packed, token_sizes = [], []
        for image in images:
            latents = self._encode_vae_image(image.to(device=device, dtype=dtype), generator=generator)
            if batch_size % latents.shape[0] != 0:
                raise ValueError(
                    f"Cannot repeat an image batch of {latents.shape[0]} to {batch_size} prompts."
                )
            latents = latents.repeat(batch_size // latents.shape[0], 1, 1, 1)
            latent_h, latent_w = latents.shape[2:]
            packed.append(self._pack_latents(latents, batch_size, num_channels_latents, latent_h, latent_w))
            token_sizes.append((latent_h // 2, latent_w // 2))
        return torch.cat(packed, dim=1), encode_reference_ids(token_sizes, device=device, dtype=dtype)

    def prepare_noise_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed initial noise for the output (or the caller's latents) and its ids ``(0, r, c)``."""
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You passed {len(generator)} generators for an effective batch size of {batch_size}; "
                "pass one generator or exactly one per image."
            )
        num_channels_latents = self.transformer.config.in_channels // 4
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        latent_ids = self._prepare_latent_image_ids(batch_size, latent_h // 2, latent_w // 2, device, dtype)
        if latents is None:
            shape = (batch_size, num_channels_latents, latent_h, latent_w)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = self._pack_latents(latents, batch_size, num_channels_latents, latent_h, latent_w)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents, latent_ids

    def settle_output_size(
        self, image_tensors: Sequence[torch.Tensor], height: int | None, width: int | None, max_area: int
    ) -> tuple[int, int]:
        """The output (height, width): as asked, else image 1's, else the default; then rescaled to
        about ``max_area`` pixels at that aspect ratio, floored to whole tokens."""
        if height is None and width is None and image_tensors:
            height, width = image_tensors[0].shape[-2:]
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        width, height = output_size(width, height, max_area, self.vae_scale_factor * 2)
        return height, width

    def prepare_timesteps(
        self, num_inference_steps: int, sigmas: list[float] | None, noise_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """The schedule, with its dynamic shift `mu` from the noisy latent's length alone."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        mu = calculate_shift(
            noise_tokens,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        return retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    def decode_latents(
        self, latents: torch.Tensor, height: int, width: int, output_type: str
    ) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
        """Unpack, unscale and decode the final latents (``output_type="latent"``: as they are)."""
        if output_type == "latent":
            return latents
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        # One image at a time: a batch decodes with one image's peak, each image as it would alone.
        image = torch.cat([self.vae.decode(row[None], return_dict=False)[0] for row in latents])
        return self.image_processor.postprocess(image, output_type=output_type)

    def denoised_latents(self, latents: torch.Tensor, noise_pred: torch.Tensor) -> torch.Tensor:
        """In ``callback_on_step_end``, from the step's result and velocity: the current estimate of the
        final latents, unpacked to ``(batch, 16, H/8, W/8)`` (a new tensor). Flow matching's
        ``x_t - sigma_t * v`` is ``x_next - sigma_next * v`` after the Euler step ``x_next = x_t +
        (sigma_next - sigma_t) * v``; ``sigma_next`` is 0 after the last step (the final latents)."""
        sigma = float(self.scheduler.sigmas[self.scheduler.step_index])
        height, width = self._output_size
        return self._unpack_latents(latents - sigma * noise_pred, height, width, self.vae_scale_factor)

    def predict_velocity(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        *,
        guidance: torch.Tensor | None,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        latent_ids: torch.Tensor,
        noise_tokens: int,
        call: str,
        step: int,
        num_inference_steps: int,
    ) -> torch.Tensor:
        """One transformer pass: the velocity of the first ``noise_tokens`` tokens (the noisy latent's).

        ``timestep`` is the scheduler's (0..1000), one per row of ``model_input``. The pass runs in
        ``transformer.cache_context(call, ...)``, which tells diffusers' step caches (when one is
        enabled) which call of which step this is; with none enabled it changes nothing.
        """
        with self.transformer.cache_context(
            call, step_index=step, num_inference_steps=num_inference_steps, timestep=timestep
        ):
            return self.transformer(
                hidden_states=model_input,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=pooled_prompt_embeds,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=latent_ids,
                joint_attention_kwargs=self._joint_attention_kwargs,
                return_dict=False,
            )[0][:, :noise_tokens]

    @torch.no_grad()
    def __call__(
        self,
        images: Sequence[PIL.Image.Image] | None = None,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 512,
        max_area: int = DEFAULT_MAX_AREA,
        resolution_buckets: Sequence[tuple[int, int]] | None = KONTEXT_BUCKETS,
    ) -> DreamOmni2PipelineOutput | tuple:
        r"""Generate one image per prompt from the prompt and the input images.

        Args:
            images: input images in the user's order; image 1 is the one to edit. Zero images is
                text-to-image. Each is converted to RGB (alpha over white, EXIF orientation applied)
                and resized to its nearest resolution bucket independently.
            height, width: requested output size. Left out: the bucketed size of image 1, or
                1024x1024 without images. Either way the size is rescaled to about ``max_area``
                pixels at the same aspect ratio and floored to multiples of 16.
            resolution_buckets: ``(width, height)`` buckets the inputs are resized to (the 17
                Kontext resolutions by default); ``None`` keeps each input's size, floored to 16.
            max_area: output area in pixels (default 1024*1024).
            callback_on_step_end: called as ``fn(pipe, step, timestep, tensors)`` after every
                denoising step, as in diffusers; setting ``pipe._interrupt`` stops the loop.
                ``tensors`` holds what ``callback_on_step_end_tensor_inputs`` names (default
                ``["latents"]``; also ``"prompt_embeds"`` and ``"noise_pred"``, the step's velocity).

        The other arguments mean what they mean in ``FluxKontextPipeline``.

        Returns:
            ``DreamOmni2PipelineOutput`` (images and per-stage ``timings``: encode, denoise,
            decode) or a tuple ``(images,)`` when ``return_dict=False``.
        """
        images = list(images or [])
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        device = self._execution_device
        timings: dict[str, float] = {}
        started = self._sync(device)

        # 1. Preprocess the inputs and settle the output size.
        image_tensors = self.preprocess_images(images, resolution_buckets)
        height, width = self.settle_output_size(image_tensors, height, width, max_area)

        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self.begin_call(guidance_scale, joint_attention_kwargs, (height, width))

        batch_size = (
            1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else len(prompt_embeds)
        )
        lora_scale = self._joint_attention_kwargs.get("scale")

        # 2. Encode the prompt (and the negative prompt for true CFG).
        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt

        def encode(
            text: str | list[str] | None,
            text_2: str | list[str] | None,
            embeds: torch.Tensor | None,
            pooled: torch.Tensor | None,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return self.encode_prompt(
                prompt=text,
                prompt_2=text_2,
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )

        # Embeddings passed in were encoded by the caller, in its own encode_prompt stage.
        with stage(Stage.ENCODE_PROMPT) if prompt_embeds is None else contextlib.nullcontext():
            prompt_embeds, pooled_prompt_embeds, text_ids = encode(
                prompt, prompt_2, prompt_embeds, pooled_prompt_embeds
            )
            if do_true_cfg:
                negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids = encode(
                    negative_prompt, negative_prompt_2, negative_prompt_embeds, negative_pooled_prompt_embeds
                )

        # 3. Encode the input images (VAE mode, shift and scale, pack) and give them their ids.
        # Images are encoded before the noise is drawn, as in FluxKontextPipeline, so that one seed
        # gives the same noise in both pipelines.
        total = batch_size * num_images_per_prompt
        dtype = prompt_embeds.dtype
        with stage(Stage.ENCODE_IMAGES):
            image_latents, image_ids = self.prepare_image_latents(
                image_tensors, total, dtype, device, generator
            )
            del image_tensors  # encoded: the pixels need not live through denoising
            latents, latent_ids = self.prepare_noise_latents(
                total, height, width, dtype, device, generator, latents
            )
            if image_ids is not None:
                latent_ids = torch.cat([latent_ids, image_ids], dim=0)

            # 4. Timesteps: the shift `mu` depends on the output's length only, not on the inputs.
            timesteps, num_inference_steps = self.prepare_timesteps(
                num_inference_steps, sigmas, latents.shape[1], device
            )
            self._num_timesteps = len(timesteps)
            guidance = None
            if self.transformer.config.guidance_embeds:
                guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
                guidance = guidance.expand(latents.shape[0])
        timings["encode"] = (now := self._sync(device)) - started

        # 5. Denoise: noisy tokens first, then every input image's tokens; keep the noisy part.
        def predict(
            model_input: torch.Tensor,
            timestep: torch.Tensor,
            embeds: torch.Tensor,
            pooled: torch.Tensor,
            ids: torch.Tensor,
            call: str,
            step: int,
        ) -> torch.Tensor:
            return self.predict_velocity(
                model_input,
                timestep,
                guidance=guidance,
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                text_ids=ids,
                latent_ids=latent_ids,
                noise_tokens=latents.size(1),
                call=call,
                step=step,
                num_inference_steps=num_inference_steps,
            )

        self.scheduler.set_begin_index(0)
        with stage(Stage.DENOISE), self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                self._current_timestep = t
                model_input = latents if image_latents is None else torch.cat([latents, image_latents], dim=1)
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                noise_pred = predict(
                    model_input, timestep, prompt_embeds, pooled_prompt_embeds, text_ids, "cond", i
                )
                if do_true_cfg:
                    neg_noise_pred = predict(
                        model_input,
                        timestep,
                        negative_prompt_embeds,
                        negative_pooled_prompt_embeds,
                        negative_text_ids,
                        "uncond",
                        i,
                    )
                    noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)

                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "noise_pred": noise_pred}
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()
        self._current_timestep = None
        timings["denoise"] = (now2 := self._sync(device)) - now

        # 6. Decode.
        with stage(Stage.DECODE):
            image = self.decode_latents(latents, height, width, output_type)
        timings["decode"] = self._sync(device) - now2

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return DreamOmni2PipelineOutput(images=image, timings=timings)
