"""The reference's chain around the pipeline: one resize from the raw size, shared by both models.

The reference scripts resize every upload once to the Kontext bucket nearest its raw aspect ratio
(Lanczos) and hand those images to the pipeline, with image 1's size as the output size, and to the
translator. These tests restate that rule independently and hold `Engine.run` to it exactly, on the
tiny weights with the method's real buckets.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from api_schemas.jobs import JobParameters
from models.architectures import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS
from models.buckets import KONTEXT_BUCKETS
from models.engine import Engine
from models.settings import EngineSettings

#: The reference's utils/vprocess.py list, as (width, height).
REFERENCE_BUCKETS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
]  # fmt: skip
CASES = {
    "1080x1350": [(1080, 1350)],
    "4032x3024": [(4032, 3024)],
    "1920x1080": [(1920, 1080)],
    "512x512": [(512, 512)],
    "640x480": [(640, 480)],
    "five mixed": [(1080, 1350), (4032, 3024), (1920, 1080), (3024, 4032), (640, 480)],
}


def reference_resize(image: PIL.Image.Image) -> PIL.Image.Image:
    """The reference's `resizeinput`, restated: the raw aspect picks the bucket, one Lanczos resize."""
    aspect = image.width / image.height
    _, width, height = min((abs(aspect - w / h), w, h) for w, h in REFERENCE_BUCKETS)
    return image.resize((width // 16 * 16, height // 16 * 16), PIL.Image.LANCZOS)


def upload(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: smooth gradients plus mild noise (random noise would not compress)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [127 + 100 * np.sin(x / (37 + 11 * c) + seed) * np.cos(y / (53 + 7 * c)) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3))
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def uploads() -> dict[str, list[bytes]]:
    made: dict[tuple[int, int], bytes] = {}
    for sizes in CASES.values():
        for n, size in enumerate(sizes):
            made.setdefault(size, upload(*size, seed=n))
    return {name: [made[size] for size in sizes] for name, sizes in CASES.items()}


@pytest.fixture(scope="module")
def engine(tiny_cache) -> Engine:
    # The tiny weights with the method's own buckets; a small output area keeps the runs quick.
    return Engine.from_settings(
        EngineSettings(preset="tiny", cache_dir=tiny_cache, device="cpu", bucket_scale=1.0, translator=False)
    )


def decoded(data: bytes) -> PIL.Image.Image:
    return PIL.Image.open(io.BytesIO(data)).convert("RGB")


def test_the_engine_uses_the_reference_buckets():
    assert [tuple(b) for b in KONTEXT_BUCKETS] == REFERENCE_BUCKETS


def test_the_raw_size_picks_the_bucket(engine, uploads):
    (portrait,) = engine.prepare_images([decoded(uploads["1080x1350"][0])])
    assert portrait.size == (944, 1104)
    # Stock Kontext's rule (size floored to 16 first: 1072x1344) would pick another bucket here.
    floored = 1072 / 1344
    assert min((abs(floored - w / h), w, h) for w, h in REFERENCE_BUCKETS)[1:] == (880, 1184)


@pytest.mark.parametrize("case", list(CASES))
def test_engine_run_equals_the_reference_chain_exactly(engine, uploads, case):
    params = JobParameters(instruction="make the bag in image 1 use the pattern of the dress in image 2",
                           steps=1, seed=5, translate=False)  # fmt: skip
    result = engine.run(uploads[case], params)

    bucketed = [reference_resize(decoded(data)) for data in uploads[case]]
    engine.adapters.activate(result.metadata.adapter)
    expected = engine.pipeline(
        images=bucketed,
        height=bucketed[0].height,
        width=bucketed[0].width,
        prompt=params.instruction,
        num_inference_steps=1,
        guidance_scale=result.metadata.guidance,
        generator=torch.Generator("cpu").manual_seed(5),
        max_area=engine.max_area,
        resolution_buckets=KONTEXT_BUCKETS,  # the pipeline's own auto-resize on, as in the reference
    ).images[0]
    assert np.array_equal(np.asarray(result.image), np.asarray(expected))


@pytest.fixture(scope="module")
def realistic_translator_engine(tiny_root, tmp_path_factory) -> Engine:
    """The tiny VLM behind the real Qwen2.5-VL processor bounds, loaded through the published layout."""
    root = tmp_path_factory.mktemp("release")
    for name in ("edit_lora", "gen_lora", "vlm-model"):
        shutil.copytree(tiny_root / name, root / name)
    config_path = root / "vlm-model" / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config.update(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    config_path.write_text(json.dumps(config))
    return Engine.from_settings(
        EngineSettings(
            preset="dreamomni2",
            base_model=str(tiny_root / "kontext"),
            adapters=str(root),
            device="cpu",
            max_area=64 * 64,
            bucket_scale=1.0,
            translator_max_new_tokens=2,
        )
    )


def test_the_translator_sees_the_bucketed_images(realistic_translator_engine, uploads):
    engine = realistic_translator_engine
    assert engine.translator.processor.image_processor.size == {
        "shortest_edge": QWEN_MIN_PIXELS,
        "longest_edge": QWEN_MAX_PIXELS,
    }
    sizes = [(4032, 3024), (512, 512), (640, 480), (1080, 1350), (1920, 1080)]
    data = [upload(*size, seed=n) for n, size in enumerate(sizes)]
    grids = []

    def record(module, args, kwargs):
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        grids.append(grid.tolist())

    # The vision tower is what the image grid feeds; it runs once per translation.
    handle = engine.translator.model.model.visual.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = engine.run(
            data, JobParameters(instruction="put the hat of image 2 on image 1", steps=1, seed=1)
        )
    finally:
        handle.remove()
    assert result.metadata.translation_raw is not None

    # What the stock Qwen2.5-VL image processor gives for the reference's bucketed images.
    stock = Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    bucketed = [reference_resize(decoded(d)) for d in data]
    assert grids[0] == stock(images=bucketed, return_tensors="pt")["image_grid_thw"].tolist()
    # 4032x3024 -> 62x84 (1302 tokens), 512x512 upscaled -> 74x74 (1369), 640x480 -> 62x84,
    # 1080x1350 -> 78x68.
    assert grids[0][:4] == [[1, 62, 84], [1, 74, 74], [1, 62, 84], [1, 78, 68]]
    assert [h * w // 4 for _, h, w in grids[0][:2]] == [1302, 1369]
