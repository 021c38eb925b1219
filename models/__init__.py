"""Everything that touches tensors: the DreamOmni2 pipeline, its adapters, the translator, the engine,
Feature Mixing.

Names are imported lazily, so `import models.settings` stays light (no torch, no diffusers).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DreamOmni2Pipeline": "models.pipeline",
    "DreamOmni2PipelineOutput": "models.pipeline",
    "encode_reference_ids": "models.pipeline",
    "Engine": "models.engine",
    "JobOutput": "models.sampling",
    "EngineSettings": "models.settings",
    "MixingConfig": "models.mixing",
    "feature_mixing": "models.mixing",
    "FeatureMixingOutput": "models.pairs",
    "MemoryMode": "models.modes",
    "MemoryPlan": "models.memory",
    "plan_memory": "models.memory",
    "Preset": "models.settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
