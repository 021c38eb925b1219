"""GPU cards as sold (GB, 10^9 bytes) and as PyTorch sees them (GiB, 2^30 bytes), and the CUDA context.

A "24 GB" L4 has 22.5 GiB: vendors count memory in decimal gigabytes (or round it), `nvidia-smi` and
PyTorch report bytes, and the CUDA context takes a slice of that before the first tensor exists. The
planner's card table, the start-up fit check and the GPU benches' caps all read this one catalogue.
Free of torch, so settings and docs can read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
MiB = 1024**2
GB = 10**9

#: What the CUDA context and the driver take on a card before PyTorch allocates anything (cuBLAS and
#: cuDNN handles included): about 0.5 GiB on recent drivers, 1 GiB allowed. An allowance the table
#: and the benches' caps subtract, not a measurement; the worker itself reads the real free memory
#: (`torch.cuda.mem_get_info`) with its context already created.
CONTEXT_ALLOWANCE_BYTES = 1 * GiB


@dataclass(frozen=True)
class Card:
    """One GPU model: its marketing size and the total memory the driver reports for it."""

    name: str
    #: The size the card is sold as, in GB.
    sold_gb: int
    #: `nvidia-smi --query-gpu=memory.total` in MiB (what `torch.cuda.get_device_properties` reports).
    total_mib: int

    @property
    def total_bytes(self) -> int:
        return self.total_mib * MiB

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    @property
    def usable_bytes(self) -> int:
        """What PyTorch can allocate once the CUDA context exists (the allowance subtracted)."""
        return self.total_bytes - CONTEXT_ALLOWANCE_BYTES

    def label(self) -> str:
        """`L4 24 GB (22.5 GiB)`."""
        return f"{self.name} {self.sold_gb} GB ({self.total_gib:.1f} GiB)"


#: Totals as the NVIDIA driver reports them (MiB).
CARDS: dict[str, Card] = {
    card.name: card
    for card in (
        Card("L4", 24, 23034),
        Card("A10", 24, 23028),
        Card("RTX 4090", 24, 24564),
        Card("A100 40GB", 40, 40960),
        Card("L40S", 48, 46068),
        Card("RTX 6000 Ada", 48, 49140),
        Card("A6000", 48, 49140),
        Card("A100 80GB", 80, 81920),
        Card("H100 80GB", 80, 81559),
        Card("H200", 141, 143771),
    )
}

#: The smallest card of each size class: a mode documented for "24 GB" must fit the L4 and the A10.
SMALLEST_OF_CLASS: dict[int, Card] = {}
for _card in CARDS.values():
    _known = SMALLEST_OF_CLASS.get(_card.sold_gb)
    if _known is None or _card.total_mib < _known.total_mib:
        SMALLEST_OF_CLASS[_card.sold_gb] = _card
del _card, _known


def card_class(sold_gb: int) -> Card:
    """The smallest known card sold as `sold_gb` GB (a size class's worst case)."""
    if sold_gb not in SMALLEST_OF_CLASS:
        known = ", ".join(str(gb) for gb in sorted(SMALLEST_OF_CLASS))
        raise ValueError(f"no card of {sold_gb} GB is known; known sizes: {known}")
    return SMALLEST_OF_CLASS[sold_gb]
