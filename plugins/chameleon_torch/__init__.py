"""Chameleon for plain PyTorch/transformers model servers.

    handle = chameleon_torch.attach(model, AdapterClient("127.0.0.1:50051"))
    with handle.adapt(input_ids, attention_mask) as batch:
        model.generate(input_ids=input_ids, attention_mask=attention_mask, ...)
    handle.detach()

TLS, mTLS and the bearer token are the client's: `AdapterClient(address, security=ClientSecurity(...))`
(or `ClientSecurity.from_env()`, the CHAMELEON_TLS_* and CHAMELEON_AUTH_TOKEN_FILE variables the engine
plugins read).

Talks to the adapter service only through `adapter_service.client`, `adapter_service.core` and the
torch-side `adapter_service.models`; never imports the service itself.
"""

from adapter_service.extras import require

require("chameleon_torch", "torch", "torch", "transformers")

from chameleon_torch.config import PluginConfig
from chameleon_torch.metrics import FALLBACK_REASONS, PluginMetrics
from chameleon_torch.model import AdapterHandle, BatchAdaptation, ManifestMismatch, attach, check_model

__all__ = [
    "FALLBACK_REASONS",
    "AdapterHandle",
    "BatchAdaptation",
    "ManifestMismatch",
    "PluginConfig",
    "PluginMetrics",
    "attach",
    "check_model",
]
