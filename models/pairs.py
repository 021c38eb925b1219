"""Feature Mixing pairs as a pipeline method: `DreamOmni2Pipeline.generate_pair`.

The attention processors and their configuration are `models.mixing`'s; this is the sampling loop
that runs both branches of a pair through them, as a method of the pipeline (it sets the pipeline's
own per-call state, as `__call__` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch

from models.mixing import MixingConfig, MixingPhase, feature_mixing
from models.modes import Stage
from models.stages import stage

if TYPE_CHECKING:
    from models.pipeline import DreamOmni2Pipeline


@dataclass
class FeatureMixingOutput:
    """Both images of a pair, source first, and what ran.

    ``images``: a list of two PIL images (``output_type="pil"``), an array ``(2, H, W, 3)`` (``"np"``)
    or the packed latents ``(2, tokens, channels)`` (``"latent"``).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    #: Seconds per stage: encode (prompts and noise), denoise, decode.
    timings: dict[str, float]
    mixed_steps: int
    mixed_layers: int
    #: Transformer calls made (two per step, or one batch-2 call per step when batched).
    transformer_calls: int


class FeatureMixingPipelineMixin:
    """`generate_pair` for `DreamOmni2Pipeline` (mixed into it; it uses the pipeline's own steps)."""

    @torch.no_grad()
    def generate_pair(
        self: DreamOmni2Pipeline,
        source_prompt: str | None = None,
        target_prompt: str | None = None,
        *,
        config: MixingConfig | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        generator: torch.Generator | None = None,
        source_prompt_embeds: torch.Tensor | None = None,
        source_pooled_prompt_embeds: torch.Tensor | None = None,
        target_prompt_embeds: torch.Tensor | None = None,
        target_pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        max_area: int | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable[..., dict[str, Any] | None] | None = None,
    ) -> FeatureMixingOutput:
        r"""Generate a Feature Mixing pair (source, target) from one seed, text to image.

        Whatever adapter is active samples both branches (the method: base Kontext, none). Both
        branches start from the noise an ordinary ``pipe(prompt=..., generator=generator)`` call of
        that size draws, so the source is that ordinary generation of the source prompt
        (bit-identical in the default sequential form), and with nothing mixing the target is the
        ordinary generation of the target prompt.

        Args:
            source_prompt, target_prompt: the two prompts; or pass their embeddings instead
                (``*_prompt_embeds`` and ``*_pooled_prompt_embeds``, as `encode_prompt` returns them).
            config: blocks, step fraction, strength, batching (`MixingConfig`; default the plain method).
            height, width, max_area: the output size, as in `DreamOmni2Pipeline.__call__` without images
                (``max_area`` left out: about 1 MP, the method's).
            callback_on_step_end: called as ``fn(pipe, step, timestep, {"latents": latents,
                "noise_pred": velocity})`` after every denoising step (both branches, source first);
                it may return replacement ``latents``; setting ``pipe._interrupt`` stops the loop; an
                exception it raises leaves the transformer's processors restored.

        Returns:
            `FeatureMixingOutput` with the two images, source first, and per-stage timings.
        """
        config = config or MixingConfig()
        device = self._execution_device
        timings: dict[str, float] = {}
        started = self._sync(device)

        # 1. The output size, the prompts, the shared noise.
        height, width = self.settle_output_size([], height, width, max_area or self.default_max_area)
        self.begin_call(guidance_scale, None, (height, width))
        size = (height, width, max_sequence_length)
        source_embeds, source_pooled, text_ids = self._pair_prompt(
            source_prompt, source_prompt_embeds, source_pooled_prompt_embeds, *size
        )
        target_embeds, target_pooled, target_text_ids = self._pair_prompt(
            target_prompt, target_prompt_embeds, target_pooled_prompt_embeds, *size
        )
        if config.batched and source_embeds.shape != target_embeds.shape:
            raise ValueError(
                f"MixingConfig(batched=True) needs prompt embeddings of one shape; got "
                f"{tuple(source_embeds.shape)} and {tuple(target_embeds.shape)}."
            )
        dtype = source_embeds.dtype
        with stage(Stage.ENCODE_IMAGES):
            # One draw, as an ordinary call with this generator makes; both branches start from it.
            noise, latent_ids = self.prepare_noise_latents(1, height, width, dtype, device, generator)
            latents = noise.repeat(2, 1, 1)
            noise_tokens = noise.shape[1]
            timesteps, num_inference_steps = self.prepare_timesteps(
                num_inference_steps, None, noise_tokens, device
            )
            self._num_timesteps = len(timesteps)
            guidance = None
            if self.transformer.config.guidance_embeds:
                guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
        timings["encode"] = (now := self._sync(device)) - started

        # 2. Denoise both branches, mixing in the first `mixed_steps` steps.
        def predict(
            model_input: torch.Tensor,
            embeds: torch.Tensor,
            pooled: torch.Tensor,
            ids: torch.Tensor,
            t: torch.Tensor,
            call: str,
            step: int,
        ) -> torch.Tensor:
            batch = model_input.shape[0]
            return self.predict_velocity(
                model_input,
                t.expand(batch).to(model_input.dtype),
                guidance=None if guidance is None else guidance.expand(batch),
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                text_ids=ids,
                latent_ids=latent_ids,
                noise_tokens=noise_tokens,
                call=call,
                step=step,
                num_inference_steps=num_inference_steps,
            )

        calls = 0
        with stage(Stage.DENOISE), feature_mixing(self.transformer, config) as state:
            mixed_steps = config.mixed_steps(num_inference_steps) if state.layers else 0
            state.noise_tokens = noise_tokens
            self.scheduler.set_begin_index(0)
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        break
                    self._current_timestep = t
                    state.active = i < mixed_steps
                    if config.batched:
                        state.phase, state.text_tokens = MixingPhase.PAIRED, source_embeds.shape[1]
                        velocity = predict(
                            latents,
                            torch.cat([source_embeds, target_embeds]),
                            torch.cat([source_pooled, target_pooled]),
                            text_ids,
                            t,
                            "pair",
                            i,
                        )
                        calls += 1
                    else:
                        state.phase, state.text_tokens = MixingPhase.CAPTURE, source_embeds.shape[1]
                        source = predict(latents[:1], source_embeds, source_pooled, text_ids, t, "source", i)
                        state.phase, state.text_tokens = MixingPhase.INJECT, target_embeds.shape[1]
                        target = predict(
                            latents[1:], target_embeds, target_pooled, target_text_ids, t, "target", i
                        )
                        velocity = torch.cat([source, target])
                        calls += 2
                    # Elementwise: stepping both rows at once rounds exactly as stepping each alone.
                    latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

                    if callback_on_step_end is not None:
                        tensors = {"latents": latents, "noise_pred": velocity}
                        outputs = callback_on_step_end(self, i, t, tensors) or {}
                        latents = outputs.pop("latents", latents)
                    progress_bar.update()
            layers = state.layers if mixed_steps else 0
        self._current_timestep = None
        timings["denoise"] = (now2 := self._sync(device)) - now

        # 3. Decode each image on its own (as an ordinary call decodes its batch of one).
        with stage(Stage.DECODE):
            images = self._decode_pair(latents, height, width, output_type)
        timings["decode"] = self._sync(device) - now2
        self.maybe_free_model_hooks()
        return FeatureMixingOutput(
            images=images,
            timings=timings,
            mixed_steps=mixed_steps,
            mixed_layers=layers,
            transformer_calls=calls,
        )

    def _pair_prompt(
        self: DreamOmni2Pipeline,
        prompt: str | None,
        embeds: torch.Tensor | None,
        pooled: torch.Tensor | None,
        height: int,
        width: int,
        max_sequence_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One branch's prompt checked and encoded (or its embeddings taken as they are), batch 1."""
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError("A Feature Mixing pair takes one source and one target prompt, each a str.")
        self.check_inputs(
            prompt,
            None,
            height,
            width,
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            max_sequence_length=max_sequence_length,
        )
        embeds, pooled, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            device=self._execution_device,
            max_sequence_length=max_sequence_length,
        )
        if embeds.shape[0] != 1:
            raise ValueError("A Feature Mixing pair takes one source and one target prompt (batch 1 each).")
        return embeds, pooled, text_ids

    def _decode_pair(
        self: DreamOmni2Pipeline, latents: torch.Tensor, height: int, width: int, output_type: str
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """Both rows of ``latents`` decoded one at a time, as an ordinary call decodes its batch of one."""
        decoded = [self.decode_latents(latents[k : k + 1], height, width, output_type) for k in range(2)]
        if output_type == "pil":
            return [image for batch in decoded for image in batch]
        if isinstance(decoded[0], np.ndarray):
            return np.concatenate(decoded)
        return torch.cat(decoded)
