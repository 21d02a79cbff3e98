"""STAND-IN, not TGI (see text_generation_server/__init__.py): `cli.py`'s `app`, the console script's target.

`serve MODEL_DIR` imports `server` lazily (as TGI's cli does), starts the model, and prints one JSON line
describing what is installed, so a test can run the `text-generation-server` shim in a subprocess.
"""

from __future__ import annotations

import json
import sys


def app() -> None:
    command, *args = sys.argv[1:]
    if command != "serve":
        print(json.dumps({"command": command}))
        return
    from text_generation_server import server
    from text_generation_server.models.flash_causal_lm import FlashCausalLM, FlashCausalLMBatch

    model = server.serve(args[0])
    print(
        json.dumps(
            {  # wrappers made with functools.wraps keep the original's name and module, but not __wrapped__
                "wrapped": sorted(
                    name
                    for name, obj in (
                        ("generate_token", FlashCausalLM.generate_token),
                        ("warmup", FlashCausalLM.warmup),
                        ("filter", FlashCausalLMBatch.filter),
                        ("get_model_with_lora_adapters", server.get_model_with_lora_adapters),
                    )
                    if hasattr(obj, "__wrapped__")
                ),
                "model_attributes": sorted(k for k in vars(model) if k.startswith("_")),
                "modules": sorted(m for m in sys.modules if m.startswith("chameleon_tgi")),
            }
        )
    )
