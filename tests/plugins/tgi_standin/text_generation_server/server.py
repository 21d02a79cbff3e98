"""STAND-IN, not TGI (see text_generation_server/__init__.py): `server.py`'s start-up order.

Imports get_model_with_lora_adapters by name at module import (which is why the plugin patches it in
`text_generation_server.models` before this module is imported), builds the adapter_to_index dict,
loads the model, then publishes the dict with set_adapter_to_index.
"""

from __future__ import annotations

from text_generation_server.models import get_model_with_lora_adapters
from text_generation_server.models.globals import set_adapter_to_index


def serve(model_id: str, dtype: str = "float32"):
    adapter_to_index: dict[str, int] = {}
    model = get_model_with_lora_adapters(
        model_id, [], None, False, None, None, dtype, None, False, 4096, adapter_to_index
    )
    set_adapter_to_index(adapter_to_index)
    return model
