"""Both DreamOmni2 LoRAs, loaded once, one of them (or none) active per job."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from diffusers import FluxKontextPipeline

from api_schemas.common import AdapterChoice
from api_schemas.loras import AppliedLora
from models.user_loras import SidePath, UserLoras

#: The published layout: `edit_lora/` and `gen_lora/`, each holding this diffusers-format file.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class AdapterSet:
    """The edit and generation LoRAs on one pipeline's transformer, switched without reloading.

    The reference runs each LoRA unfused at weight 1.0; so do we, which keeps both resident and makes
    a switch a flag change rather than a weight copy.
    """

    names: dict[AdapterChoice, str] = {AdapterChoice.EDIT: "edit", AdapterChoice.GENERATION: "gen"}

    def __init__(self, pipeline: FluxKontextPipeline, user: UserLoras | None = None):
        """Switch adapters already on ``pipeline`` under the names in `names`; `load` reads them first.

        `user`: the operator's registered LoRAs, stacked per job beside the layers (`SidePath`).
        """
        self.pipeline = pipeline
        self.user = user
        self.active: AdapterChoice | None = None
        # Installed at the first job that stacks a LoRA: a compiled profile replaces this object first.
        self._side_path: SidePath | None = None
        # Loading leaves the last adapter active; start from a known state.
        self.activate(AdapterChoice.BASE)

    @classmethod
    def load(
        cls, pipeline: FluxKontextPipeline, *, edit: Path, generation: Path, user: UserLoras | None = None
    ) -> AdapterSet:
        """Load both LoRAs from the published layout: folders holding `LORA_WEIGHT_NAME`."""
        with warnings.catch_warnings():
            # peft warns that a second adapter joins the first: exactly what we want here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for choice, folder in ((AdapterChoice.EDIT, edit), (AdapterChoice.GENERATION, generation)):
                pipeline.load_lora_weights(
                    str(folder), weight_name=LORA_WEIGHT_NAME, adapter_name=cls.names[choice]
                )
        return cls(pipeline, user)

    def activate(self, choice: AdapterChoice, loras: Sequence[AppliedLora] = ()) -> None:
        """Make ``choice`` the only active DreamOmni2 adapter (`BASE`: none), with the registered
        ``loras`` stacked on it in order; every LoRA of the previous job is gone."""
        chosen = self.user.weights(loras) if self.user is not None and loras else []
        if chosen and self._side_path is None:
            self._side_path = SidePath(self.pipeline.transformer, self.user.targets)
        if choice is AdapterChoice.BASE:
            self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([self.names[choice]], adapter_weights=[1.0])
        if self._side_path is not None:
            device = getattr(self.pipeline, "compute_device", None) or self.pipeline.device
            self._side_path.set(chosen, device)
        self.active = choice
