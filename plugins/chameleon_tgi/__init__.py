"""Chameleon for Hugging Face Text Generation Inference (TGI 3.3.7), without forking it.

Switched on by CHAMELEON_TGI=1 in the shard's environment, through the `text-generation-server` shim
(bin/) or the `chameleon_tgi.pth` line: both only install a post-import hook (autoload.py), and the
patches (patch.py) are applied when TGI itself imports `text_generation_server.models`. This module
stays import-free so that neither path loads torch, grpc or TGI early.
"""

TESTED_TGI_VERSION = "3.3.7"

__all__ = ["TESTED_TGI_VERSION"]
