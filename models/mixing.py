"""Feature Mixing: DreamOmni2's paired-data synthesis, a source and a target image that share one attribute.

Two branches run the same FLUX.1 Kontext transformer (base weights, no LoRA, no input image) from the
same initial noise: the source branch with the source prompt, the target branch with the target
prompt. In every mixed attention layer the target attends over its own tokens plus the source
branch's noise (image) tokens of the same layer and step::

    Q = [Q_tar_text; Q_tar_noise]
    K = [K_tar_text; K_tar_noise; K_src_noise]      V = [V_tar_text; V_tar_noise; V_src_noise]
    out = softmax(Q K^T / sqrt(d) + B) V            B = log(strength) on the source columns, else 0

(diffusers orders the joint sequence text first; the order of keys changes nothing.) The source
branch attends only to itself: it is an ordinary generation. What the paper leaves open, chosen here:

- Blocks (`MixingConfig.blocks`): every double- and single-stream block by default; `double`,
  `single` or `none` restrict it.
- Steps (`MixingConfig.step_fraction`): the first ``round(step_fraction * steps)`` denoising steps
  mix, the rest run both branches unmixed (the per-step switch is `MixingState.active`).
- Strength (`MixingConfig.strength`): the target's attention weights over the source keys are
  multiplied by ``strength`` before renormalisation (``log(strength)`` added to those logits); 1 is
  the method's plain formula, 0 no mixing at all. In bf16 the bias is a bf16 number (about 0.4 %).
- Positions: the source keys keep the RoPE they got in the source branch, which are the target's own
  noise positions ``(0, r, c)`` (both branches share the grid): no new position ids, nothing
  recomputed. With RoPE's relative encoding a target token is closest to the source token at its
  own place, so features are lent where they sit (good for a material or a pattern); it also pulls
  the target toward the source's layout, which a lower strength or fewer mixed steps loosen. An
  offset grid (as Kontext gives input images) would be the alternative; it is not implemented.
- Branches: by default each step runs the transformer twice with batch 1, the source pass first
  (its mixed layers keep their noise keys and values, post-norm and post-RoPE), then the target pass
  (which appends them). Both passes are then exactly an ordinary batch-1 call, so the source image is
  bit-identical to an ordinary generation with that seed (and, with mixing off, so is the target).
  `MixingConfig.batched` runs both branches as one batch of 2 per call instead, the literal "at the
  same time" (same FLOPs, no kept keys and values; it may fill a GPU better, not measured yet; but
  batch-2 matrix products do not round like batch-1 ones, so the source then equals an ordinary
  generation only to about 1e-6 in float32).
- Attention backend: the configured one (`transformer.set_attention_backend`) wherever no bias is
  needed (strength 1); with strength < 1 the target's mixed calls go to one that takes a float mask
  (`native` SDPA, unless the configured one is `_native_efficient` or `_native_math`).
- Compiled blocks (`DREAMOMNI2_SPEED=compiled`/`fp8`): a pair runs eagerly (`torch.compiler.set_stance
  ("force_eager")`), so nothing recompiles and the compiled graphs serve the next ordinary job
  unchanged. Its source then equals the eager ordinary generation (a compiled one is within 2 levels
  of it).

Cost: two transformer passes per step plus the target's attention over one extra image's worth of
keys (2.18x the FLOPs of one generation at 1024x1024), and in the default sequential form the
source's noise keys and values of every mixed layer, held for the target pass (2.67 GiB in bf16 at
1024x1024); `models.memory.mixing_cost` has the figures.

The sampling loop that runs both branches through these processors is the pipeline's
`generate_pair` (`models.pairs`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

# The projection helper of diffusers' own FluxAttnProcessor (fused or separate q/k/v), so both take
# the same path through the weights.
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from api_schemas.common import MixBlocks

if TYPE_CHECKING:
    from api_schemas.jobs import ResolvedJob

#: Backends that honour a float attention mask (the strength's bias); others get `native` for it.
MASK_BACKENDS = frozenset({"native", "_native_efficient", "_native_math"})


@dataclass(frozen=True)
class MixingConfig:
    """Which blocks mix, for which leading fraction of the steps, how strongly, and how batched."""

    blocks: MixBlocks = MixBlocks.ALL
    #: Fraction of the denoising steps that mix, counted from the first; ``round(fraction * steps)``.
    step_fraction: float = 1.0
    #: Multiplier of the target's attention weights over the source keys (1: the plain formula).
    strength: float = 1.0
    #: One batch-2 call per step (both branches at once) instead of two exact batch-1 passes.
    batched: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", MixBlocks(self.blocks))
        for name in ("step_fraction", "strength"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MixingConfig.{name} must be between 0 and 1; got {value}.")

    @classmethod
    def from_job(cls, job: ResolvedJob) -> MixingConfig:
        """The configuration a resolved `feature_mixing` job asks for (defaults: the plain method)."""
        return cls(
            blocks=job.mix_blocks or MixBlocks.ALL,
            step_fraction=1.0 if job.mix_steps is None else job.mix_steps,
            strength=1.0 if job.mix_strength is None else job.mix_strength,
        )

    def mixed_steps(self, steps: int) -> int:
        """How many of ``steps`` denoising steps mix (0 when nothing can mix)."""
        if not self.mixes:
            return 0
        return min(steps, round(self.step_fraction * steps))

    @property
    def mixes(self) -> bool:
        """Whether any layer can mix at all (blocks chosen, a strength, a share of the steps)."""
        return self.blocks is not MixBlocks.NONE and self.strength > 0.0 and self.step_fraction > 0.0

    def describe(self, mixed_steps: int, mixed_layers: int) -> dict[str, str | float | int]:
        """The job metadata's `mixing` entry: what was asked, and the steps and layers that mixed."""
        return {
            "blocks": self.blocks.value,
            "step_fraction": self.step_fraction,
            "strength": self.strength,
            "mixed_steps": mixed_steps,
            "mixed_layers": mixed_layers,
        }


def mixing_layers(transformer: torch.nn.Module, blocks: MixBlocks) -> list[torch.nn.Module]:
    """The attention modules of ``transformer`` (a FLUX transformer) that ``blocks`` selects, in order."""
    blocks = MixBlocks(blocks)
    chosen: list[torch.nn.Module] = []
    if blocks in (MixBlocks.ALL, MixBlocks.DOUBLE):
        chosen += [block.attn for block in transformer.transformer_blocks]
    if blocks in (MixBlocks.ALL, MixBlocks.SINGLE):
        chosen += [block.attn for block in transformer.single_transformer_blocks]
    return chosen


class MixingPhase(StrEnum):
    """What the mixing processors do in the current transformer call."""

    #: Source pass of the sequential form: ordinary attention; keep the noise keys and values.
    CAPTURE = "capture"
    #: Target pass of the sequential form: attend over own tokens plus the kept source ones.
    INJECT = "inject"
    #: One call holding both branches: batch ``[sources; targets]``, the first half the sources.
    PAIRED = "paired"


@dataclass
class MixingState:
    """Shared by one job's mixing processors: the per-step switch, the phase and the token layout."""

    config: MixingConfig
    #: The per-step switch: off, every processor is the original one (an ordinary call).
    active: bool = False
    phase: MixingPhase = MixingPhase.CAPTURE
    #: Text tokens at the front of the joint sequence, then this many noise tokens.
    text_tokens: int = 0
    noise_tokens: int = 0
    #: Attention layers with a mixing processor installed.
    layers: int = 0
    #: The source's (keys, values) of its noise tokens per layer, between its pass and the target's.
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def noise(self) -> slice:
        return slice(self.text_tokens, self.text_tokens + self.noise_tokens)


class FeatureMixingAttnProcessor:
    """Attention processor of `FluxAttention` (double- and single-stream blocks) for Feature Mixing.

    Computes exactly what diffusers' `FluxAttnProcessor` computes (same projections, norms, RoPE and
    `dispatch_attention_fn` on the configured backend), then, while `MixingState.active`, gives the
    target branch the source branch's noise keys and values as well (see the module docstring).
    Inactive, it hands the call to the processor it replaced.
    """

    def __init__(self, state: MixingState, layer: int, original: Callable[..., Any]):
        self.state = state
        self.layer = layer
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        if not state.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("Feature Mixing does not take an attention mask (FLUX passes none).")
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] != state.text_tokens:
            raise ValueError(
                f"MixingState.text_tokens is {state.text_tokens} but this call has "
                f"{encoder_hidden_states.shape[1]} text tokens."
            )
        query, key, value = self._project(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        noise = state.noise
        if state.phase is MixingPhase.CAPTURE:
            # Copies, so that the rest of this layer's tensors (the text part, a fused q/k/v output)
            # are freed as usual.
            state.store[self.layer] = (key[:, noise].clone(), value[:, noise].clone())
            out = self._attend(query, key, value)
        elif state.phase is MixingPhase.INJECT:
            source_key, source_value = state.store.pop(self.layer)
            out = self._attend_mixed(query, key, value, source_key, source_value)
        else:
            half = query.shape[0] // 2
            src, tar = slice(0, half), slice(half, None)
            out = torch.cat(
                [
                    self._attend(query[src], key[src], value[src]),
                    self._attend_mixed(query[tar], key[tar], value[tar], key[src, noise], value[src, noise]),
                ]
            )
        return self._output(attn, out.flatten(2, 3).to(query.dtype), encoder_hidden_states)

    @staticmethod
    def _project(
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # As FluxAttnProcessor: (batch, tokens, heads, head_dim), text first, RoPE applied.
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        return query, key, value

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return dispatch_attention_fn(query, key, value, backend=self._attention_backend)

    def _attend_mixed(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        source_key: torch.Tensor,
        source_value: torch.Tensor,
    ) -> torch.Tensor:
        own = key.shape[1]
        key = torch.cat([key, source_key], dim=1)
        value = torch.cat([value, source_value], dim=1)
        strength = self.state.config.strength
        if strength == 1.0:
            return self._attend(query, key, value)
        bias = torch.zeros(1, 1, 1, key.shape[1], device=query.device, dtype=query.dtype)
        bias[..., own:] = math.log(strength)
        backend = self._attention_backend
        backend = backend if backend in MASK_BACKENDS else "native"
        return dispatch_attention_fn(query, key, value, attn_mask=bias, backend=backend)

    @staticmethod
    def _output(
        attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            return hidden_states
        text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text, hidden_states.shape[1] - text], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


@contextlib.contextmanager
def feature_mixing(transformer: torch.nn.Module, config: MixingConfig) -> Iterator[MixingState]:
    """Mixing processors on the layers ``config.blocks`` selects, for the duration; yields their state.

    The original processors (the very objects) are put back on the way out, however it is left (an
    exception, a cancel). Nothing is installed when nothing can mix (blocks `none`, strength 0).
    Inside, compiled code runs eagerly (`torch.compiler.set_stance("force_eager")`): compiled blocks
    would otherwise recompile around the new processors; eager they run this code as written, and
    their compiled graphs stay valid for the next ordinary job. The caller sets `MixingState.active`,
    `phase` and the token layout before each transformer call.
    """
    state = MixingState(config)
    layers = mixing_layers(transformer, config.blocks) if config.mixes else []
    originals = [(attn, attn.processor) for attn in layers]
    if any(getattr(p, "_parallel_config", None) is not None for _, p in originals):
        # The kept source keys are whole-sequence tensors; a sharded sequence would need them gathered.
        raise ValueError(
            "Feature Mixing runs on one device per pair: turn off context-parallel attention for it."
        )
    try:
        for index, (attn, original) in enumerate(originals):
            attn.set_processor(FeatureMixingAttnProcessor(state, index, original))
        state.layers = len(originals)
        with torch.compiler.set_stance("force_eager"):
            yield state
    finally:
        for attn, original in originals:
            attn.set_processor(original)
        state.store.clear()
        state.active = False
