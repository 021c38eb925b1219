"""RoPE position ids in bf16 against the DreamOmni2 reference recipe, rounding included.

The recipe, as the public reference builds it (github.com/dvlab-research/DreamOmni2,
`dreamomni2/pipeline_dreamomni2.py`, class `DreamOmni2Pipeline`; restated here, not copied):

- `_prepare_latent_image_ids(batch_size, height, width, device, dtype)` (diffusers' FluxPipeline
  helper) builds a float32 grid of shape (height, width, 3) with channel 1 = row and channel 2 =
  column, flattens it row-major and only then casts it to `dtype`.
- `prepare_latents(images, ..., dtype, ...)` gets `dtype = prompt_embeds.dtype`, which is bf16 in the
  reference scripts (`inference_edit.py` / `inference_gen.py` load the pipeline with
  `torch_dtype=torch.bfloat16`). For input image i (0-based) it takes that helper's ids for the
  image's packed (rows, cols), already in bf16, then sets channel 0 to i + 1 and adds `w_offset`
  (the packed widths of the images before it) to channel 2, both in place in bf16. It also
  accumulates an `h_offset` that nothing reads: there is no row offset. The images' ids are
  concatenated in input order.
- The noisy latent's ids are the helper's (0, r, c) for the output's packed size, in the same dtype;
  `__call__` concatenates them before the images' ids.

So the reference's column ids are bf16 values: above 256 bf16 keeps only even integers (above 512
multiples of 4), and neighbouring columns of a late image share an id.

Which bf16 value an odd offset gives depends on where `ids[..., 2] += w_offset` runs. The reference
runs on CUDA, where PyTorch's add kernel loads each bf16 id as fp32, adds the Python int exactly and
rounds once on the store (TensorIterator promotes a CPU scalar to the common dtype only when the
common device is the CPU; CUDA's scalar kernels read it at its own dtype): `bf16(c + w_offset)`. The
same line on a CPU first turns `w_offset` into a bf16 scalar, so an odd offset above 256 is rounded
twice: with offset 291 (a 1568-wide input, then 672-, 1024- and 1392-wide ones) column 47 becomes
340 on a CPU and 338 on the GPU (measured on the CPU with torch 2.13; the GPU side read off PyTorch's
source, no GPU in this session). The recipe below is the GPU's arithmetic, the one the method ran
with; `encode_reference_ids` (exact integers in float32, one cast) gives it on every device.
These tests hold our ids to the recipe's, bit for bit, in bf16, and check that the rounding happens.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from models.buckets import KONTEXT_BUCKETS, TOKEN_PIXELS
from models.pipeline import DreamOmni2Pipeline, encode_reference_ids

BF16 = torch.bfloat16


def recipe_grid_ids(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference's helper: a float32 (index 0, row, col) grid, flattened row-major, then cast."""
    grid = torch.zeros(rows, cols, 3)
    grid[..., 1] = torch.arange(rows, dtype=torch.float32).unsqueeze(1)
    grid[..., 2] = torch.arange(cols, dtype=torch.float32).unsqueeze(0)
    return grid.flatten(0, 1).to(dtype)


def recipe_image_ids(token_sizes: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    """The reference's image ids: the helper's grid in `dtype`, then the index and the column offset.

    The offset is added as CUDA's kernel adds a Python int to a bf16 tensor: in fp32, the int exact,
    one rounding back to `dtype`.
    """
    parts, offset = [], 0
    for position, (rows, cols) in enumerate(token_sizes):
        ids = recipe_grid_ids(rows, cols, dtype)
        ids[:, 0] = position + 1
        ids[:, 2] = (ids[:, 2].float() + offset).to(dtype)
        parts.append(ids)
        offset += cols
    return torch.cat(parts)


def exact_columns(token_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """The column id each image token would have with exact integers (float64)."""
    columns, offset = [], 0
    for rows, cols in token_sizes:
        columns.append((torch.arange(cols, dtype=torch.float64) + offset).repeat(rows))
        offset += cols
    return torch.cat(columns)


def tokens_of(width: int, height: int) -> tuple[int, int]:
    return height // TOKEN_PIXELS, width // TOKEN_PIXELS


FIVE_SQUARE = [tokens_of(1024, 1024)] * 5  # five 1 MP inputs: offsets 0, 64, ..., 256; columns to 319
FIVE_BUCKETS = [tokens_of(*KONTEXT_BUCKETS[i]) for i in (16, 0, 8, 13, 4)]  # mixed aspects, to 413
SEVEN_WIDE = [tokens_of(*KONTEXT_BUCKETS[16])] * 7  # 98 columns each: past 512, multiples of 4


@pytest.mark.parametrize(
    "token_sizes", [FIVE_SQUARE, FIVE_BUCKETS, SEVEN_WIDE], ids=["square", "mixed", "wide"]
)
def test_reference_ids_in_bf16_equal_the_recipe_bit_for_bit(token_sizes):
    ours = encode_reference_ids(token_sizes, dtype=BF16)
    recipe = recipe_image_ids(token_sizes, BF16)
    assert ours.dtype == recipe.dtype == BF16
    assert torch.equal(ours.view(torch.int16), recipe.view(torch.int16))  # bit patterns, not values

    # The rounding is real: past 256 bf16 holds no odd integer, so columns collide and move.
    exact = exact_columns(token_sizes)
    columns = ours[:, 2].double()
    assert exact.max() > 256
    assert torch.equal(columns[exact <= 256], exact[exact <= 256])
    assert (columns != exact).any() and (columns[exact > 256] % 2 == 0).all()
    assert torch.equal(columns, exact.to(BF16).double())  # each id is its integer, rounded once
    # The index and row channels stay exact (at most 7 images and 98 rows).
    assert torch.equal(ours[:, :2].double(), encode_reference_ids(token_sizes)[:, :2].double())


def test_five_square_inputs_share_column_ids_in_the_fifth_image():
    ids = encode_reference_ids(FIVE_SQUARE, dtype=BF16)
    fifth = ids[4 * 64 * 64 :].view(64, 64, 3)  # image 5: offset 256, columns 256..319 exactly
    assert fifth[0, :4, 2].tolist() == [256, 256, 258, 260]  # 257 ties to even (256), 259 to 260
    assert len(set(fifth[0, :, 2].tolist())) == 33  # 64 columns, 33 distinct ids
    # In float32 (the default) every id is its exact integer.
    assert torch.equal(encode_reference_ids(FIVE_SQUARE)[:, 2].double(), exact_columns(FIVE_SQUARE))


def noise_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_bf16_pipeline_gives_the_transformer_the_recipes_ids(tiny_root):
    # Wide strips keep the tiny model's work small while the packed widths add up past 256; the
    # fourth image's offset, 98 + 98 + 67 = 263, is odd (not a bf16 value itself).
    sizes = [(1568, 32), (1568, 32), (1072, 32), (1024, 32)]
    pipe = DreamOmni2Pipeline.from_pretrained(tiny_root / "kontext", dtype=BF16)
    pipe.set_progress_bar_config(disable=True)
    seen: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["img_ids"].clone()), with_kwargs=True
    )
    try:
        pipe(
            images=[noise_image(w, h, seed) for seed, (w, h) in enumerate(sizes)],
            prompt="a cat",
            height=32,
            width=48,
            max_area=32 * 48,
            num_inference_steps=1,
            resolution_buckets=None,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    token_sizes = [tokens_of(w, h) for w, h in sizes]
    recipe = torch.cat([recipe_grid_ids(2, 3, BF16), recipe_image_ids(token_sizes, BF16)])
    assert seen[0].dtype == BF16
    assert torch.equal(seen[0].view(torch.int16), recipe.view(torch.int16))
    assert (seen[0][6:, 2].double() != exact_columns(token_sizes)).any()  # rounded, as the reference
