"""STAND-IN, not TGI: re-creates, from plugins/chameleon_tgi/TGI_INTERNALS.md, only the parts of TGI 3.3.7's
Python model server that chameleon_tgi touches, so its glue can be tested on CPU.

Same module paths, class and method names, signatures and tensor layouts as TGI_INTERNALS.md gives; the LoRA
reference math is TGI's pure-torch masked path (`LoraLinear.forward_lora`) plus a loop re-creation of the
punica kernels (../punica_sgmv.py). Attention, KV cache and sampling are simplified (per-request caches,
greedy): they are not what the plugin touches. Real TGI cannot run here (not on PyPI, needs CUDA); the GPU
check is scripts/validate_tgi_gpu.sh.
"""
