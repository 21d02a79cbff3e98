"""STAND-IN, not TGI (see text_generation_server/__init__.py): `text_generation_server.adapters`."""

from text_generation_server.adapters.weights import AdapterBatchData, AdapterBatchMetadata

__all__ = ["AdapterBatchData", "AdapterBatchMetadata"]
