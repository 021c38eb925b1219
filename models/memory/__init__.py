"""The memory planner: a worker's GPU peak and host memory in a memory mode, predicted without a weight.

A worker holds five networks: the FLUX.1 Kontext transformer (with both LoRAs), T5-XXL, CLIP-L, the
VAE and the Qwen2.5-VL translator. The memory mode (`models.modes.MODES`, the table the engine's
placement also reads) says which of them are on the GPU in which stage of a job. One module per
concern:

- `sizes`: the networks' weight bytes and tensor sizes, from the full-size architectures built on
  the meta device (fp8 storage applied by the worker's own code), LoRAs from the files' headers;
- `tracing`: each stage's activations, the real forward code run on fake tensors;
- `plan`: per stage and device, the weights present plus the stage's activations; the host memory
  the mode keeps (the swapped groups' blocks, as `models.pinned` packs them);
- `mixing_cost`: a Feature Mixing pair against one generation (bytes and FLOPs);
- `fit`: the start-up check against the free GPU and host memory, naming what would fit;
- `ledger`: the live-memory ledger the tests hold the plan to on the tiny weights.

The prediction is of the memory PyTorch allocates; the CUDA context (a few hundred MiB, outside
PyTorch) is not in it, which is why the start-up check compares it with the memory still free once
the context exists (`torch.cuda.mem_get_info`), with `FIT_HEADROOM` to spare for the allocator's
fragmentation and library workspaces.
"""

from models.memory.fit import (
    FIT_HEADROOM,
    HOST_OVERHEAD_BYTES,
    MemoryPlanError,
    available_host_bytes,
    check_fit,
    fits,
    max_batch_that_fits,
    max_images_that_fit,
)
from models.memory.mixing_cost import MixingCost, mixing_cost, transformer_flops
from models.memory.plan import ComponentPlan, MemoryPlan, host_memory, plan_memory
from models.memory.sizes import (
    ASSUMED_LORA_RANK,
    T5_TOKENS,
    ArchitectureSizes,
    GiB,
    layout_sizes,
    module_bytes,
    published_sizes,
)
from models.memory.tracing import JobShape, job_shape, kept_kv_bytes, traced_peak_bytes

__all__ = [
    "ASSUMED_LORA_RANK",
    "FIT_HEADROOM",
    "HOST_OVERHEAD_BYTES",
    "T5_TOKENS",
    "ArchitectureSizes",
    "ComponentPlan",
    "GiB",
    "JobShape",
    "MemoryPlan",
    "MemoryPlanError",
    "MixingCost",
    "available_host_bytes",
    "check_fit",
    "fits",
    "host_memory",
    "job_shape",
    "kept_kv_bytes",
    "layout_sizes",
    "max_batch_that_fits",
    "max_images_that_fit",
    "mixing_cost",
    "module_bytes",
    "plan_memory",
    "published_sizes",
    "traced_peak_bytes",
    "transformer_flops",
]
