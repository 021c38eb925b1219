"""Host copies of weights in a few large blocks, pinned next to a GPU: close to the weights' own size.

torch's pinned-memory allocator rounds every allocation up to a power of two, and pinned pages stay
with the process for its life. Pinning a model tensor by tensor therefore costs up to twice its size
(T5-XXL's 8.9 GiB become 12.3 GiB, Qwen2.5-VL's 15.5 become 29.2). Here a group's tensors are packed
into blocks whose sizes are powers of two (nothing to round), filled largest tensor first, each block
as large as what is left to place allows (at most `MAX_BLOCK`), so only the last small blocks have
slack. `pack_blocks` is pure arithmetic: the memory planner runs it on the published models' tensor
sizes and predicts exactly the bytes `HostBlocks` will pin.

On a CPU-only machine the same blocks are ordinary memory: the layout, and the accounting of it,
are the same code on both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

#: Every tensor starts on a multiple of this many bytes in its block (DMA-friendly, any dtype).
ALIGNMENT = 512
#: The smallest block allocated (smaller leftovers still take one of these).
MIN_BLOCK = 2**16
#: The largest block, unless one tensor needs more: a few blocks per model, none absurdly large.
MAX_BLOCK = 2**30


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def next_power_of_two(nbytes: int) -> int:
    return 1 << max(0, nbytes - 1).bit_length()


def rounded_pins(sizes: Iterable[int]) -> int:
    """Bytes torch's pinned allocator takes to pin tensors of `sizes` one by one (each rounded up to a
    power of two): what pinning tensor by tensor costs, as diffusers' group offloading does."""
    return sum(next_power_of_two(size) for size in sizes if size)


@dataclass(frozen=True)
class BlockLayout:
    """Where each tensor goes: block sizes (powers of two) and, per tensor, (block, byte offset)."""

    blocks: tuple[int, ...]
    places: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(self.blocks)


def pack_blocks(sizes: Sequence[int]) -> BlockLayout:
    """Pack tensors of `sizes` bytes into power-of-two blocks, largest first (first fit decreasing).

    Each new block is the largest power of two not above the bytes still to place (between
    `MIN_BLOCK` and `MAX_BLOCK`), or the smallest that holds the largest tensor still to place.
    Empty tensors take no room (place (0, 0)).
    """
    places = [(0, 0)] * len(sizes)
    blocks: list[int] = []
    used: list[int] = []
    remaining = sorted((i for i, size in enumerate(sizes) if size > 0), key=lambda i: -sizes[i])
    while remaining:
        left = sum(aligned(sizes[i]) for i in remaining)
        block = min(MAX_BLOCK, 1 << (left.bit_length() - 1))
        blocks.append(max(MIN_BLOCK, block, next_power_of_two(aligned(sizes[remaining[0]]))))
        used.append(0)
        unplaced = []
        for i in remaining:
            size = aligned(sizes[i])
            # First fit over the open blocks, the new one last: earlier blocks' gaps fill first.
            for b, capacity in enumerate(blocks):
                if used[b] + size <= capacity:
                    places[i] = (b, used[b])
                    used[b] += size
                    break
            else:
                unplaced.append(i)
        remaining = unplaced  # shorter every round: the new block holds the largest tensor left
    return BlockLayout(tuple(blocks), tuple(places))


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of `modules`, each once (tied or shared ones included once)."""
    seen: set[int] = set()
    found = []
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                found.append(tensor)
    return found


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class HostBlocks:
    """Host copies of `tensors`, packed into a few blocks (pinned when `pin`); `views[i]` is tensor i's.

    The copies are views into the blocks with the tensors' shapes and dtypes. With `adopt`, each
    tensor's `.data` is pointed at its copy as soon as it is made, block by block, so the originals
    are freed as the blocks fill (the host holds about one block more than the weights, not twice
    them). Empty tensors get empty tensors.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], *, pin: bool, adopt: bool = False):
        self.layout = pack_blocks([tensor_bytes(t) for t in tensors])
        self.pinned = pin
        self.blocks: list[torch.Tensor] = []
        self.views: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        by_block: dict[int, list[int]] = {}
        for i, (tensor, (block, _)) in enumerate(zip(tensors, self.layout.places, strict=True)):
            if tensor_bytes(tensor) == 0:
                self.views[i] = torch.empty(tensor.shape, dtype=tensor.dtype)
            else:
                by_block.setdefault(block, []).append(i)
        for block, size in enumerate(self.layout.blocks):
            memory = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            self.blocks.append(memory)
            for i in by_block.get(block, []):
                tensor, (_, offset) = tensors[i], self.layout.places[i]
                view = memory[offset : offset + tensor_bytes(tensor)].view(tensor.dtype).view(tensor.shape)
                with torch.no_grad():
                    view.copy_(tensor.detach())
                self.views[i] = view
                if adopt:
                    tensor.data = view

    @property
    def nbytes(self) -> int:
        """Bytes held: the blocks' total (what the allocator took)."""
        return self.layout.nbytes
