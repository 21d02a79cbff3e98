"""Tensor codec: numpy arrays <-> `chameleon.v1.Tensor` (dtype, shape, little-endian bytes).

The one place bytes become arrays, shared by server, client and plugins, so every side checks
the same things: a known dtype, a valid shape, and a byte length that equals dtype x shape.
Decoding is zero-copy (the array is a read-only view of the message's bytes); bfloat16 uses
ml_dtypes so it stays 2 bytes a value end to end.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from adapter_service.proto import adapter_service_pb2 as pb

if TYPE_CHECKING:
    import torch

# Wire dtype <-> (name, little-endian numpy dtype).
_NUMPY: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}
_NAMES: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
SUPPORTED_DTYPES: tuple[str, ...] = tuple(_NAMES)
MAX_VALUES = 2**31 - 1  # most values (and largest dimension) of a decoded tensor
MAX_DIMS = 32


class CodecError(ValueError):
    """A tensor that does not match what was expected; `field` names where it was found."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def dtype_name(dtype: int) -> str:
    """`DTYPE_FLOAT16` -> "float16"; raises CodecError for unknown or unspecified values."""
    for name, value in _NAMES.items():
        if value == dtype:
            return name
    raise CodecError("dtype", f"unknown value {dtype}; expected one of {_expected_dtypes()}")


def parse_dtype(dtype: str | int, field: str = "dtype") -> int:
    """Accept a wire enum value or a name ("float16", "fp16", "bf16", ...); return the enum value."""
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.lower(), dtype.lower())
        if name not in _NAMES:
            raise CodecError(field, f"unknown dtype {dtype!r}; expected one of {', '.join(SUPPORTED_DTYPES)}")
        return _NAMES[name]
    if int(dtype) not in _NUMPY:
        raise CodecError(field, f"unknown value {int(dtype)}; expected one of {_expected_dtypes()}")
    return int(dtype)


def numpy_dtype(dtype: str | int) -> np.dtype:
    return _NUMPY[parse_dtype(dtype)]


def encode(array: np.ndarray, dtype: str | int | None = None) -> pb.Tensor:
    """Pack `array` as a Tensor, converting to `dtype` (default: the array's own, if supported)."""
    array = np.asarray(array)
    if dtype is None:
        dtype = _from_numpy(array.dtype)
    wire = parse_dtype(dtype)
    data = np.ascontiguousarray(array, dtype=_NUMPY[wire])
    return pb.Tensor(dtype=wire, shape=data.shape, data=data.tobytes())


def decode(
    tensor: pb.Tensor,
    field: str = "tensor",
    *,
    shape: tuple[int | None, ...] | None = None,
    dtype: str | int | None = None,
    require_finite: bool = False,
) -> np.ndarray:
    """Unpack a Tensor strictly; a read-only zero-copy view of its bytes.

    `shape` may hold None for free dimensions; `dtype` restricts the accepted wire dtype.
    """
    if tensor.dtype == pb.DTYPE_UNSPECIFIED:
        raise CodecError(f"{field}.dtype", f"unspecified; expected one of {_expected_dtypes()}")
    wire = parse_dtype(tensor.dtype, f"{field}.dtype")
    if dtype is not None and wire != parse_dtype(dtype):
        raise CodecError(
            f"{field}.dtype", f"got {dtype_name(wire)}, expected {dtype_name(parse_dtype(dtype))}"
        )
    dims = tuple(int(d) for d in tensor.shape)  # Python ints: the checks below cannot overflow
    shown = _shape_text(dims)
    if shape is not None and len(dims) != len(shape):
        want = ", ".join("*" if e is None else str(e) for e in shape)
        raise CodecError(f"{field}.shape", f"got {shown}, expected [{want}]")
    if len(dims) > MAX_DIMS:
        raise CodecError(f"{field}.shape", f"{len(dims)} dimensions; expected at most {MAX_DIMS}")
    if any(d < 0 for d in dims):
        raise CodecError(f"{field}.shape", f"{shown} has a negative dimension; expected sizes >= 0")
    # Checked before numpy sees the shape: [2**62, 0] holds no values, matches empty data, and would
    # still make numpy raise. No real tensor is near the bound (bytes fields stop at 2 GiB).
    if any(d > MAX_VALUES for d in dims) or math.prod(d for d in dims if d) > MAX_VALUES:
        raise CodecError(
            f"{field}.shape", f"{shown} is out of range; expected dimensions whose product is <= {MAX_VALUES}"
        )
    if shape is not None and any(e is not None and d != e for d, e in zip(dims, shape, strict=True)):
        want = ", ".join("*" if e is None else str(e) for e in shape)
        raise CodecError(f"{field}.shape", f"got {shown}, expected [{want}]")
    np_dtype = _NUMPY[wire]
    count = math.prod(dims)
    expected_bytes = count * np_dtype.itemsize
    if len(tensor.data) != expected_bytes:
        raise CodecError(
            f"{field}.data",
            f"{len(tensor.data)} bytes, expected {expected_bytes} "
            f"({dtype_name(wire)} x shape {shown} = {count} values x {np_dtype.itemsize} bytes)",
        )
    array = np.frombuffer(tensor.data, dtype=np_dtype).reshape(dims)
    if require_finite and not np.isfinite(array.astype(np.float32, copy=False)).all():
        bad = int(np.count_nonzero(~np.isfinite(array.astype(np.float32))))
        raise CodecError(
            f"{field}.data", f"{bad} non-finite values (NaN or Inf); expected only finite values"
        )
    return array


def to_torch(array: np.ndarray, device: Any = None, dtype: Any = None) -> torch.Tensor:
    """numpy (incl. ml_dtypes bfloat16) -> torch; one copy, since decoded arrays view read-only bytes."""
    import torch

    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        tensor = torch.from_numpy(np.array(array.view(np.uint16))).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    if device is not None or dtype is not None:
        tensor = tensor.to(device=device, dtype=dtype)
    return tensor


def _from_numpy(dtype: np.dtype) -> int:
    for wire, np_dtype in _NUMPY.items():
        if np_dtype == dtype.newbyteorder("<"):
            return wire
    raise CodecError(
        "dtype", f"numpy dtype {dtype} is not supported; expected one of {', '.join(SUPPORTED_DTYPES)}"
    )


def _shape_text(dims: tuple[int, ...]) -> str:
    """A shape for a message, bounded however many dimensions a caller sent."""
    if len(dims) <= 8:
        return str(list(dims))
    return f"[{', '.join(str(d) for d in dims[:8])}, ...] ({len(dims)} dimensions)"


def _expected_dtypes() -> str:
    return ", ".join(pb.DType.Name(v) for v in _NUMPY)
