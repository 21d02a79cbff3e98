"""STAND-IN, not TGI (see text_generation_server/__init__.py): `adapters/config.py` (AdapterConfig)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class AdapterConfig(ABC):
    base_model_name_or_path: str

    @abstractmethod
    def map_weights_for_model(self, adapter_weights, weight_names):
        """Map PEFT tensor names onto the model's weight names (used by the static-adapter loader)."""
