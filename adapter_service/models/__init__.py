"""The torch side shared by the plugins and the trainer: loading a model (Hugging Face directory, hub id
or GGUF), finding its adaptable modules and fingerprinting it, and the request statistic."""

from adapter_service.extras import require

require("Chameleon's model side (plugins, training, serve-model)", "torch", "torch", "transformers")
