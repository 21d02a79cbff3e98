"""Chameleon adapter service: batch statistics in, per-cluster LoRA adapters out.

Kept import-light on purpose: plugins import `adapter_service.client` and `adapter_service.core.codec`
inside model servers, which must not pay for onnxruntime, torch or the server.
"""

__version__ = "0.3.0"
