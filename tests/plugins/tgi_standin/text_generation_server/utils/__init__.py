"""STAND-IN, not TGI (see text_generation_server/__init__.py): `text_generation_server.utils`."""
