"""STAND-IN, not TGI (see text_generation_server/__init__.py): the generated `generate_pb2` messages.

Plain dataclasses with the fields used here; `Request.adapter_id` is proto3 `optional string` (field 11),
read as "" when unset, and the plugin rewrites it in place as it would on the protobuf object.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StoppingCriteriaParameters:
    max_new_tokens: int = 8


@dataclass
class Request:
    id: int
    inputs: str
    adapter_id: str = ""
    stopping_parameters: StoppingCriteriaParameters = field(default_factory=StoppingCriteriaParameters)


@dataclass
class Batch:
    id: int
    requests: list[Request]
