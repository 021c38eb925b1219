"""Everything that touches tensors: the DreamOmni2 pipeline, its adapters, the translator, the engine."""

from models.engine import Engine, JobOutput
from models.pipeline import DreamOmni2Pipeline, DreamOmni2PipelineOutput, encode_reference_ids
from models.settings import EngineSettings, Offload, Preset

__all__ = [
    "DreamOmni2Pipeline",
    "DreamOmni2PipelineOutput",
    "Engine",
    "EngineSettings",
    "JobOutput",
    "Offload",
    "Preset",
    "encode_reference_ids",
]
