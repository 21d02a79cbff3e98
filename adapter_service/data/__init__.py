"""Corpora (presets and local files) for training and studies, and the files shipped with the package:
the demo's trained artifact and SmolLM2's config."""
