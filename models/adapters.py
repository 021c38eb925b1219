"""Both DreamOmni2 LoRAs, loaded once, one of them (or none) active per job."""

from __future__ import annotations

import warnings
from pathlib import Path

from diffusers import FluxKontextPipeline

from api_schemas.common import AdapterChoice

#: The published layout: `edit_lora/` and `gen_lora/`, each holding this diffusers-format file.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class AdapterSet:
    """The edit and generation LoRAs on one pipeline's transformer, switched without reloading.

    The reference runs each LoRA unfused at weight 1.0; so do we, which keeps both resident and makes
    a switch a flag change rather than a weight copy.
    """

    names: dict[AdapterChoice, str] = {AdapterChoice.EDIT: "edit", AdapterChoice.GENERATION: "gen"}

    def __init__(self, pipeline: FluxKontextPipeline):
        """Switch adapters already on ``pipeline`` under the names in `names`; `load` reads them first."""
        self.pipeline = pipeline
        self.active: AdapterChoice | None = None
        # Loading leaves the last adapter active; start from a known state.
        self.activate(AdapterChoice.BASE)

    @classmethod
    def load(cls, pipeline: FluxKontextPipeline, *, edit: Path, generation: Path) -> AdapterSet:
        """Load both LoRAs from the published layout: folders holding `LORA_WEIGHT_NAME`."""
        with warnings.catch_warnings():
            # peft warns that a second adapter joins the first: exactly what we want here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for choice, folder in ((AdapterChoice.EDIT, edit), (AdapterChoice.GENERATION, generation)):
                pipeline.load_lora_weights(
                    str(folder), weight_name=LORA_WEIGHT_NAME, adapter_name=cls.names[choice]
                )
        return cls(pipeline)

    def activate(self, choice: AdapterChoice) -> None:
        """Make ``choice`` the only active adapter; `BASE` turns every LoRA off."""
        if choice is AdapterChoice.BASE:
            self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([self.names[choice]], adapter_weights=[1.0])
        self.active = choice
