"""An example model server: TGI's HTTP API over a transformers model, with `chameleon_torch` applying the
sidecar's adapters per batch (`chameleon serve-model`). Apart from the plugin library on purpose: the
plugin is what users embed; this is one server built on it."""

from adapter_service.extras import require

require("The example model server (chameleon serve-model)", "torch", "torch", "transformers")
