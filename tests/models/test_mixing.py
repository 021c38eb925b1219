"""Feature Mixing on the tiny weights: exactness of both branches, the formula, restoring the processors,
the engine's pair jobs, compiled blocks, and the planner's cost."""

from __future__ import annotations

import functools
import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch._dynamo.utils
from diffusers.models.embeddings import apply_rotary_emb

from api_schemas.common import AdapterChoice, Task
from api_schemas.errors import JobCanceled
from api_schemas.jobs import JobParameters
from models.engine import Engine
from models.memory import GiB, kept_kv_bytes, layout_sizes, mixing_cost, plan_memory, transformer_flops
from models.mixing import FeatureMixingAttnProcessor, MixingConfig
from models.pipeline import DreamOmni2Pipeline
from models.settings import EngineSettings
from models.speed import compile_blocks

SOURCE = "a glass teapot on a table"
TARGET = "a cat on a table"
SEED = 7
STEPS = 3
SIZE = dict(height=64, width=64, max_area=64 * 64)
#: The batch-2 form against batch-1 calls, on [0, 1] pixels: batch-2 matrix products round unlike
#: batch-1 ones (a one-row product, the modulation's, takes another kernel), about 1e-7 per call;
#: measured 1.4e-6 after 3 steps. Ten times that leaves room for other CPUs' kernels.
BATCHED_ATOL = 1e-5


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


@pytest.fixture(scope="module")
def engine(tiny_cache) -> Engine:
    return Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", translator=False)
    )


@pytest.fixture(scope="module")
def pipe(engine) -> DreamOmni2Pipeline:
    engine.adapters.activate(AdapterChoice.BASE)
    return engine.pipeline


def ordinary(pipe: DreamOmni2Pipeline, prompt: str, steps: int = STEPS) -> np.ndarray:
    out = pipe(
        prompt=prompt, generator=seeded(), num_inference_steps=steps, resolution_buckets=None,
        output_type="np", **SIZE,
    )  # fmt: skip
    return out.images[0]


def pair(pipe: DreamOmni2Pipeline, steps: int = STEPS, **config: object):
    return pipe.generate_pair(
        SOURCE, TARGET, config=MixingConfig(**config), generator=seeded(), num_inference_steps=steps,
        output_type="np", **SIZE,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ordinaries(pipe) -> dict[str, np.ndarray]:
    return {prompt: ordinary(pipe, prompt) for prompt in (SOURCE, TARGET)}


@pytest.fixture(scope="module")
def mixed(pipe):
    return pair(pipe)


def processors(pipe: DreamOmni2Pipeline) -> dict[str, object]:
    return dict(pipe.transformer.attn_processors)


def test_the_source_is_an_ordinary_generation_and_the_target_mixes(mixed, ordinaries):
    source, target = mixed.images
    assert np.array_equal(source, ordinaries[SOURCE])  # bit-identical
    assert np.abs(target - ordinaries[TARGET]).max() > 1e-3
    assert (mixed.mixed_steps, mixed.mixed_layers, mixed.transformer_calls) == (STEPS, 2, 2 * STEPS)


@pytest.mark.parametrize("config", [{"blocks": "none"}, {"step_fraction": 0.0}, {"strength": 0.0}])
def test_without_mixing_the_target_is_an_ordinary_generation(pipe, ordinaries, config):
    out = pair(pipe, **config)
    assert np.array_equal(out.images[0], ordinaries[SOURCE])
    assert np.array_equal(out.images[1], ordinaries[TARGET])
    assert out.mixed_steps == out.mixed_layers == 0


@pytest.mark.parametrize(
    ("config", "layers", "steps"),
    [({"blocks": "double", "step_fraction": 2 / 3}, 1, 2), ({"blocks": "single"}, 1, 3),
     ({"step_fraction": 0.34}, 2, 1), ({"strength": 0.5}, 2, 3)],
)  # fmt: skip
def test_the_chosen_blocks_mix_in_the_first_steps(
    pipe, mixed, ordinaries, monkeypatch, config, layers, steps
):
    calls = []
    attend = FeatureMixingAttnProcessor._attend_mixed

    def counted(self: FeatureMixingAttnProcessor, *args: torch.Tensor) -> torch.Tensor:
        calls.append(self.layer)
        return attend(self, *args)

    monkeypatch.setattr(FeatureMixingAttnProcessor, "_attend_mixed", counted)
    out = pair(pipe, **config)
    assert (out.mixed_layers, out.mixed_steps) == (layers, steps)
    assert len(calls) == layers * steps  # one mixed attention per mixed layer per mixed step
    assert np.array_equal(out.images[0], ordinaries[SOURCE])
    target = out.images[1]
    assert np.abs(target - ordinaries[TARGET]).max() > 1e-4 and np.abs(target - mixed.images[1]).max() > 1e-4


def test_the_batched_form_agrees_within_its_tolerance(pipe, mixed, ordinaries):
    out = pair(pipe, batched=True)
    assert out.transformer_calls == STEPS
    np.testing.assert_allclose(out.images[0], ordinaries[SOURCE], rtol=0, atol=BATCHED_ATOL)
    np.testing.assert_allclose(out.images[1], mixed.images[1], rtol=0, atol=BATCHED_ATOL)
    off = pair(pipe, batched=True, blocks="none")
    np.testing.assert_allclose(off.images[1], ordinaries[TARGET], rtol=0, atol=BATCHED_ATOL)


def hand_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int, source_k: torch.Tensor,
                   source_v: torch.Tensor, strength: float) -> torch.Tensor:  # fmt: skip
    """The method's formula with torch ops, (tokens, heads, dim) in diffusers' [text; noise] order."""
    noise = slice(text, None)
    Q = torch.cat([q[noise], q[:text]])  # [Q_tar_noise; Q_tar_text]
    K = torch.cat([k[noise], k[:text], source_k])  # [K_tar_noise; K_tar_text; K_src_noise]
    V = torch.cat([v[noise], v[:text], source_v])
    scores = torch.einsum("qhd,khd->hqk", Q, K) / math.sqrt(q.shape[-1])
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights[..., k.shape[0] :] *= strength  # the source columns, before renormalising
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.einsum("hqk,khd->qhd", weights, V)
    return torch.cat([out[-text:], out[:-text]]).flatten(1)  # back to [text; noise]


def projections(
    attn, hidden: torch.Tensor, text_hidden: torch.Tensor | None, rope
) -> tuple[torch.Tensor, ...]:
    """A layer's q, k, v of one branch, (tokens, heads, dim), text first, RoPE applied."""

    def heads(x):
        return x.unflatten(-1, (attn.heads, attn.head_dim))

    q, k, v = heads(attn.to_q(hidden)), heads(attn.to_k(hidden)), heads(attn.to_v(hidden))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if text_hidden is not None:
        tq, tk = (
            attn.norm_added_q(heads(attn.add_q_proj(text_hidden))),
            attn.norm_added_k(heads(attn.add_k_proj(text_hidden))),
        )
        q, k, v = (
            torch.cat([tq, q], 1),
            torch.cat([tk, k], 1),
            torch.cat([heads(attn.add_v_proj(text_hidden)), v], 1),
        )
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    return q[0], k[0], v[0]


@pytest.mark.parametrize("strength", [1.0, 0.3])
@pytest.mark.parametrize("kind", ["double", "single"])
def test_a_layer_computes_the_formula(pipe, kind, strength):
    blocks = (
        pipe.transformer.transformer_blocks
        if kind == "double"
        else pipe.transformer.single_transformer_blocks
    )
    attn = blocks[0].attn
    seen = []
    handle = attn.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out)), with_kwargs=True)
    try:
        pair(pipe, steps=1, strength=strength)
    finally:
        handle.remove()
    (source_kw, _), (target_kw, target_out) = seen  # the source pass, then the target pass
    with torch.no_grad():
        branches = [
            projections(attn, kw["hidden_states"], kw.get("encoder_hidden_states"), kw["image_rotary_emb"])
            for kw in (source_kw, target_kw)
        ]
        (_, sk, sv), (q, k, v) = branches
        text = 512  # T5 tokens, first in the joint sequence
        expected = hand_attention(q, k, v, text, sk[text:], sv[text:], strength)
        if kind == "double":
            expected = (attn.to_out[0](expected[text:]), attn.to_add_out(expected[:text]))
            torch.testing.assert_close(target_out[0][0], expected[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(target_out[1][0], expected[1], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(target_out[0], expected, rtol=1e-5, atol=1e-5)


def test_the_processors_come_back_after_a_pair_and_after_a_cancel(pipe, ordinaries):
    before = processors(pipe)
    pair(pipe, steps=1)
    assert all(after is before[name] for name, after in processors(pipe).items())

    installed = []

    def cancel(p, step, t, tensors):
        installed.extend(isinstance(proc, FeatureMixingAttnProcessor) for proc in processors(p).values())
        raise JobCanceled("canceled")

    with pytest.raises(JobCanceled):
        pipe.generate_pair(SOURCE, TARGET, generator=seeded(), num_inference_steps=STEPS,
                           callback_on_step_end=cancel, **SIZE)  # fmt: skip
    assert installed and all(installed)  # the mixing processors were in place when it was canceled
    assert all(after is before[name] for name, after in processors(pipe).items())
    assert np.array_equal(ordinary(pipe, TARGET), ordinaries[TARGET])  # the next job is unaffected


def test_a_feature_mixing_job_through_the_engine(engine, tiny_root):
    events = []
    edit = JobParameters(instruction="x", task=Task.EDIT, steps=2, seed=SEED, translate=False)
    engine.run([PIL.Image.new("RGB", (64, 64), "red")] * 2, edit)  # leaves the edit LoRA active
    job = JobParameters(
        task="feature_mixing",
        source_prompt=SOURCE,
        target_prompt=TARGET,
        attribute="material",
        steps=2,
        seed=SEED,
    )
    result = engine.run([], job, on_progress=lambda *e: events.append(e))
    assert len(result.images) == 2 and result.image is result.images[0]
    meta = result.metadata
    assert (meta.prompt, meta.translated, meta.fallback_reason, meta.adapter) == (SOURCE, False, None, "base")
    assert (meta.task, meta.seed, meta.image_count, meta.steps) == (Task.FEATURE_MIXING, SEED, 0, 2)
    assert (meta.source_prompt, meta.target_prompt, meta.attribute) == (SOURCE, TARGET, "material")
    assert meta.mixing == {
        "blocks": "all",
        "step_fraction": 1.0,
        "strength": 1.0,
        "mixed_steps": 2,
        "mixed_layers": 2,
    }
    assert (meta.width, meta.height) == result.images[1].size == (64, 64)
    assert meta.transformer_evaluations == 4 and set(meta.timings) == {"encode", "denoise", "decode", "total"}
    assert events == [("encode", 0, 1), ("denoise", 1, 2), ("denoise", 2, 2), ("decode", 1, 1)]
    plain = engine.run(
        [], JobParameters(instruction=SOURCE, task="generate", steps=2, seed=SEED, translate=False)
    )
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.image))  # base Kontext, same seed


def test_an_engine_pair_canceled_mid_run(engine):
    before = processors(engine.pipeline)
    steps = []
    job = JobParameters(task="feature_mixing", source_prompt=SOURCE, target_prompt=TARGET, steps=4, seed=1)
    with pytest.raises(JobCanceled, match="after denoising step 2 of 4"):
        engine.run([], job, on_progress=lambda s, n, t: steps.append(n) if s == "denoise" else None,
                   should_cancel=lambda: len(steps) >= 2)  # fmt: skip
    assert all(after is before[name] for name, after in processors(engine.pipeline).items())
    assert engine.run([], job).metadata.mixing["mixed_steps"] == 4


@pytest.mark.parametrize("mode", ["low", "stream"])
def test_a_pair_in_the_memory_modes_with_hooks(tiny_cache, mode):
    # fp8 storage casts each linear in a hook; `stream` moves the blocks in and out around their calls.
    engine = Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", translator=False, memory=mode)
    )
    job = JobParameters(task="feature_mixing", source_prompt=SOURCE, target_prompt=TARGET, steps=2, seed=SEED)
    result = engine.run([], job)
    plain = engine.run(
        [], JobParameters(instruction=SOURCE, task="generate", steps=2, seed=SEED, translate=False)
    )
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.image))
    assert result.metadata.mixing["mixed_layers"] == 2


def test_compiled_blocks_run_a_pair_eagerly_and_keep_their_graphs(tiny_root, monkeypatch):
    # The real `compile_blocks` with dynamo's eager backend: the guards and recompiles are dynamo's,
    # what inductor would generate does not matter here (and would take half a minute on a CPU).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    fresh = DreamOmni2Pipeline.from_pretrained(tiny_root / "kontext")
    fresh.set_progress_bar_config(disable=True)
    fresh.transformer.fuse_qkv_projections()  # as the compiled profiles run it
    eager = pair(fresh, steps=2).images
    assert np.array_equal(eager[0], ordinary(fresh, SOURCE, steps=2))  # fused q/k/v: exact too
    # compile_blocks turns duck shaping off; torch's own config patch puts it back afterwards (a
    # monkeypatch of a torch config entry leaves it deleted, and every later compile failing).
    duck = torch.fx.experimental._config
    with duck.patch(use_duck_shape=duck.use_duck_shape):
        compile_blocks(fresh.transformer)
        try:
            compiled = ordinary(fresh, SOURCE, steps=2)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert np.array_equal(pair(fresh, steps=2).images, eager)
            assert np.array_equal(ordinary(fresh, SOURCE, steps=2), compiled)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
        finally:
            torch._dynamo.reset()


def test_the_planner_prices_a_pair(tiny_root):
    sizes = layout_sizes(
        tiny_root / "kontext", tiny_root / "edit_lora", tiny_root / "gen_lora", tiny_root / "vlm-model"
    )
    config = sizes.transformer_config
    with pytest.raises(ValueError, match="no input image"):
        plan_memory("resident", 1, 64, sizes=sizes, feature_mixing=True)
    exact = mixing_cost("resident", 64, sizes=sizes)
    batched = mixing_cost("resident", 64, sizes=sizes, batched=True)
    # Two layers' keys and values of 16 noise tokens, width 32, in bf16.
    assert exact.kept_kv_bytes == kept_kv_bytes(config, 16) == 2 * 2 * 16 * 32 * 2
    # The tiny model's 512 text tokens dwarf its 16 noise tokens: the two-pass form needs little more
    # than one generation, the batch-2 form twice its activations.
    assert (
        exact.denoise_bytes + exact.kept_kv_bytes <= exact.mixing_denoise_bytes < batched.mixing_denoise_bytes
    )
    assert 1.8 < batched.denoise_ratio < 2.2
    assert exact.flops_per_step < exact.mixing_flops_per_step == batched.mixing_flops_per_step
    assert 2 < exact.flops_ratio < 2.1  # 16 noise tokens next to 512 text ones: the extra keys are few
    plan = plan_memory("balanced", 0, 64, sizes=sizes, feature_mixing=True)
    assert plan.activations["translate"] == 0  # the prompts are not translated
    assert plan.activations["denoise"] == exact.mixing_denoise_bytes
    # The release at 1 MP (4096 noise tokens): 57 layers x (K, V) x 4096 x 3072 x bf16 kept, and
    # two passes plus the target's attention over 4096 more keys: about 2.2x the FLOPs of one.
    release = dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
                   in_channels=64, joint_attention_dim=4096)  # fmt: skip
    assert kept_kv_bytes(release, 4096) / GiB == pytest.approx(2.67, abs=0.01)
    one = transformer_flops(release, 512, 4096)
    assert (one + transformer_flops(release, 512, 4096, extra_keys=4096)) / one == pytest.approx(
        2.18, abs=0.01
    )


def test_a_worker_without_room_for_the_exact_form_runs_pairs_batched(tiny_cache, monkeypatch):
    # The start-up check on a stand-in GPU whose free memory fits ordinary jobs but not the kept keys.
    from models.layout import check_memory, resolve_layout
    from models.memory import FIT_HEADROOM

    monkeypatch.setenv("DREAMOMNI2_MAX_IMAGES", "0")
    monkeypatch.setenv("DREAMOMNI2_BATCH_IMAGES", "1")  # the plan of one image at a time
    settings = EngineSettings(
        preset="tiny", cache_dir=tiny_cache, device="cuda", translator=False, max_area=64 * 64
    )
    layout = resolve_layout(settings)
    sizes = layout_sizes(layout.kontext, layout.edit_lora, layout.gen_lora, layout.vlm)
    # What the check plans: 0 input images (the limit), at the settings' 64x64 output area.
    one = plan_memory("resident", 0, 64, translator_device=None, sizes=sizes).peak_bytes
    pair = plan_memory("resident", 0, 64, translator_device=None, sizes=sizes, feature_mixing=True)
    pair = pair.peak_bytes
    assert pair > one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for free, exact in (
        (int(pair * (1 + FIT_HEADROOM)) + 1, True),
        (int(one * (1 + FIT_HEADROOM)) + 1, False),
    ):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 2 * free))
        check = check_memory(settings, layout, "cuda", None)
        assert check.plan.peak_bytes == one and check.exact_mixing_fits is exact
