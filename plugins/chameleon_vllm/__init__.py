"""Chameleon inside vLLM: each request's cluster adapter, applied by vLLM's own multi-LoRA machinery.

Installed with the `[vllm]` extra, the plugin is discovered through vLLM's `vllm.general_plugins`
entry point (name `chameleon`; `VLLM_PLUGINS` selects plugins as usual) and acts only when
`CHAMELEON_SIDECAR=host:port` is set; otherwise vLLM is exactly stock. Start vLLM with LoRA on:

    CHAMELEON_SIDECAR=127.0.0.1:50051 vllm serve MODEL --enable-lora --max-loras 8 --max-lora-rank 64

Talks to the adapter service only through `adapter_service.client` (and its codec); never imports
the service itself. See engine.py for what a batch is under continuous batching.
"""

from __future__ import annotations

import logging

log = logging.getLogger("vllm.chameleon")  # under "vllm": lines appear in vLLM's own log stream


def register() -> None:
    """vLLM's general-plugin entry point, called in every vLLM process (front end, engine core,
    workers), possibly more than once: installs the wrappers when CHAMELEON_SIDECAR is set."""
    from chameleon_vllm.config import VLLMPluginConfig, enabled

    if not enabled():
        return
    config = VLLMPluginConfig.from_env()  # a bad value stops vLLM with the variable's name
    from chameleon_vllm.patch import install

    install(config)
    log.info(f"chameleon_vllm on: sidecar {config.sidecar}")


__all__ = ["register"]
