"""STAND-IN, not TGI (see text_generation_server/__init__.py): `models/custom_modeling`."""
