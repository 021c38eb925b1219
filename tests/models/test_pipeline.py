"""DreamOmni2Pipeline: ids, preprocessing, output size, and equality with stock FluxKontextPipeline."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FluxKontextPipeline

from models.buckets import KONTEXT_BUCKETS, nearest_bucket, output_size, scale_buckets
from models.pipeline import DreamOmni2Pipeline, encode_reference_ids


def solid(width: int, height: int, color=(200, 30, 60), mode: str = "RGB") -> PIL.Image.Image:
    return PIL.Image.new(mode, (width, height), color)


def noise_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(tiny_root) -> DreamOmni2Pipeline:
    pipe = DreamOmni2Pipeline.from_pretrained(tiny_root / "kontext")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def capture_img_ids(pipe: DreamOmni2Pipeline) -> tuple[list[torch.Tensor], object]:
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["img_ids"].clone())

    return seen, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_reference_ids_by_hand():
    ids = encode_reference_ids([(2, 3), (4, 1), (1, 2)])
    expected = (
        [[1, r, c] for r in range(2) for c in range(3)]  # image 1: no offset, as stock Kontext
        + [[2, r, 3] for r in range(4)]  # image 2: offset = 3 (width of image 1)
        + [[3, 0, 4 + c] for c in range(2)]  # image 3: offset = 3 + 1
    )
    assert ids.tolist() == expected


def test_reference_ids_empty():
    assert encode_reference_ids([]).shape == (0, 3)


def test_ids_in_the_pipeline_for_images_of_different_aspect_ratios(pipe):
    seen, handle = capture_img_ids(pipe)
    try:
        pipe(
            images=[noise_image(64, 32, 1), noise_image(32, 48, 2), noise_image(16, 16, 3)],
            prompt="a cat",
            height=32,
            width=48,
            num_inference_steps=1,
            max_area=32 * 48,
            resolution_buckets=None,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    ids = seen[0].tolist()
    noisy = [[0, r, c] for r in range(2) for c in range(3)]  # 48x32 output: 2 rows x 3 cols of tokens
    image1 = [[1, r, c] for r in range(2) for c in range(4)]  # 64x32: 2x4 tokens
    image2 = [[2, r, 4 + c] for r in range(3) for c in range(2)]  # 32x48: 3x2 tokens, offset 4
    image3 = [[3, 0, 6]]  # 16x16: one token, offset 4 + 2
    assert ids == noisy + image1 + image2 + image3


def test_nearest_bucket_matches_the_method():
    assert nearest_bucket(1000, 1000, KONTEXT_BUCKETS) == (1024, 1024)
    assert nearest_bucket(1920, 1080, KONTEXT_BUCKETS) == (1392, 752)
    assert nearest_bucket(1080, 1920, KONTEXT_BUCKETS) == (752, 1392)
    assert nearest_bucket(5000, 100, KONTEXT_BUCKETS) == (1568, 672)
    assert len(KONTEXT_BUCKETS) == 17
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in KONTEXT_BUCKETS)


def test_scaled_buckets_stay_whole_tokens():
    tiny = scale_buckets(KONTEXT_BUCKETS, 1 / 16)
    assert (64, 64) in tiny
    assert all(w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16 for w, h in tiny)


def test_output_size_rule():
    assert output_size(1024, 1024, 1024 * 1024) == (1024, 1024)
    assert output_size(512, 512, 1024 * 1024) == (1024, 1024)  # the area is the method's, not the request's
    w, h = output_size(1392, 752, 1024 * 1024)
    assert (w % 16, h % 16) == (0, 0) and abs(w * h - 1024 * 1024) < 0.05 * 1024 * 1024


def test_each_input_goes_to_its_own_bucket(pipe):
    tensors = pipe.preprocess_images([solid(1920, 1080), solid(300, 300), solid(1080, 1920)], KONTEXT_BUCKETS)
    assert [tuple(t.shape[-2:]) for t in tensors] == [(752, 1392), (1024, 1024), (1392, 752)]


def test_preprocessing_applies_exif_and_alpha(pipe):
    rgba = PIL.Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    (t,) = pipe.preprocess_images([rgba], None)
    assert torch.allclose(t, torch.ones_like(t))  # transparent over white is white (1.0 in [-1, 1])

    tall = solid(16, 32)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    tall.info["exif"] = exif.tobytes()
    tall.getexif()[0x0112] = 6
    (t,) = pipe.preprocess_images([tall], None)
    assert tuple(t.shape[-2:]) == (16, 32)  # displayed as 32 wide, 16 high


def test_edit_output_takes_the_size_of_image_1(pipe):
    out = pipe(
        images=[solid(64, 32), solid(16, 64)],
        prompt="x",
        num_inference_steps=1,
        max_area=64 * 32,
        resolution_buckets=None,
        output_type="pil",
    )
    assert out.images[0].size == (64, 32)
    assert set(out.timings) == {"encode", "denoise", "decode"}


def run_both(tiny_root, stock_kwargs: dict, ours_kwargs: dict, image: PIL.Image.Image, steps: int = 3):
    stock = FluxKontextPipeline.from_pretrained(tiny_root / "kontext")
    stock.set_progress_bar_config(disable=True)
    ours = DreamOmni2Pipeline.from_pretrained(tiny_root / "kontext")
    ours.set_progress_bar_config(disable=True)
    common = dict(
        prompt="turn the sky green", num_inference_steps=steps, guidance_scale=3.5, output_type="np"
    )
    a = stock(image=image, generator=torch.Generator().manual_seed(7), **common, **stock_kwargs).images
    b = ours(images=[image], generator=torch.Generator().manual_seed(7), **common, **ours_kwargs).images
    return a, b


def test_one_image_no_lora_equals_stock_kontext_exactly(tiny_root):
    image = noise_image(80, 48, 5)
    a, b = run_both(
        tiny_root,
        dict(height=48, width=80, max_area=80 * 48, _auto_resize=False),
        dict(max_area=80 * 48, resolution_buckets=None),
        image,
    )
    assert a.shape == b.shape == (1, 48, 80, 3)
    assert np.array_equal(a, b)


def test_equals_stock_kontext_with_the_methods_defaults(tiny_root):
    # Default buckets and 1 MP output: a 64x64 input goes to the 1024x1024 bucket in both pipelines.
    a, b = run_both(tiny_root, dict(height=1024, width=1024), dict(), noise_image(64, 64, 9), steps=1)
    assert a.shape == b.shape == (1, 1024, 1024, 3)
    assert np.array_equal(a, b)


def test_same_seed_same_image_and_inputs_matter(pipe):
    kwargs = dict(
        prompt="x", num_inference_steps=2, max_area=32 * 32, resolution_buckets=None, output_type="np"
    )
    one = pipe(
        images=[noise_image(32, 32, 1), noise_image(32, 32, 2)],
        generator=torch.Generator().manual_seed(3),
        **kwargs,
    )
    two = pipe(
        images=[noise_image(32, 32, 1), noise_image(32, 32, 2)],
        generator=torch.Generator().manual_seed(3),
        **kwargs,
    )
    swapped = pipe(
        images=[noise_image(32, 32, 2), noise_image(32, 32, 1)],
        generator=torch.Generator().manual_seed(3),
        **kwargs,
    )
    assert np.array_equal(one.images, two.images)
    assert not np.array_equal(one.images, swapped.images)


def test_text_only_generation(pipe):
    out = pipe(prompt="a red bag", height=32, width=64, num_inference_steps=1, max_area=32 * 64)
    assert out.images[0].size == (64, 32)


def test_interrupt_stops_the_loop(pipe):
    steps_seen = []

    def stop_after_two(p, i, t, tensors):
        steps_seen.append(i)
        if i == 1:
            p._interrupt = True
        return {}

    pipe(
        prompt="x",
        height=16,
        width=16,
        num_inference_steps=6,
        max_area=16 * 16,
        callback_on_step_end=stop_after_two,
    )
    assert steps_seen == [0, 1]
