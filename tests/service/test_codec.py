import ml_dtypes
import numpy as np
import pytest
import torch

from adapter_service.core import codec
from adapter_service.proto import adapter_service_pb2 as pb


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_each_dtype(dtype: str) -> None:
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    tensor = codec.encode(x, dtype)
    assert tensor.dtype == codec.parse_dtype(dtype)
    assert list(tensor.shape) == [3, 5]
    assert len(tensor.data) == 15 * {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    back = codec.decode(tensor, shape=(3, 5), dtype=dtype)
    expected = x.astype(codec.numpy_dtype(dtype))
    assert back.dtype == expected.dtype
    assert np.array_equal(back.view(np.uint8), expected.view(np.uint8))


def test_bytes_are_little_endian() -> None:
    tensor = codec.encode(np.array([1.0], dtype=">f4"), "float32")
    assert tensor.data == np.array([1.0], dtype="<f4").tobytes() == b"\x00\x00\x80\x3f"


def test_decode_is_zero_copy_and_read_only() -> None:
    tensor = codec.encode(np.arange(6, dtype=np.float32).reshape(2, 3))
    array = codec.decode(tensor)
    assert not array.flags.writeable
    assert array.base is not None  # a view of the message's bytes, not a copy


def test_byte_length_mismatch_names_field_and_expected() -> None:
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=b"\x00" * 20)
    with pytest.raises(codec.CodecError, match=r"stats\.data: 20 bytes, expected 24") as info:
        codec.decode(tensor, "stats")
    assert info.value.field == "stats.data"


def test_unknown_and_unspecified_dtype() -> None:
    with pytest.raises(codec.CodecError, match=r"x\.dtype: unknown value 9; expected one of DTYPE_FLOAT32"):
        codec.decode(pb.Tensor(dtype=9, shape=[1], data=b"\x00" * 4), "x")
    with pytest.raises(codec.CodecError, match=r"x\.dtype: unspecified"):
        codec.decode(pb.Tensor(shape=[1], data=b"\x00" * 4), "x")
    with pytest.raises(codec.CodecError, match="unknown dtype 'int8'"):
        codec.parse_dtype("int8")


def test_shape_and_dtype_expectations() -> None:
    tensor = codec.encode(np.zeros((2, 3), np.float32))
    with pytest.raises(codec.CodecError, match=r"t\.shape: got \[2, 3\], expected \[\*, 4\]"):
        codec.decode(tensor, "t", shape=(None, 4))
    with pytest.raises(codec.CodecError, match=r"t\.dtype: got float32, expected float16"):
        codec.decode(tensor, "t", dtype="fp16")
    with pytest.raises(codec.CodecError, match="negative"):
        codec.decode(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, 2], data=b""), "t")


def test_require_finite() -> None:
    tensor = codec.encode(np.array([1.0, np.nan, np.inf], np.float32))
    with pytest.raises(codec.CodecError, match="2 non-finite values"):
        codec.decode(tensor, require_finite=True)


def test_to_torch_bfloat16_keeps_bits() -> None:
    x = np.array([1.5, -2.25, 3.0e-3], np.float32)
    array = codec.decode(codec.encode(x, "bfloat16"))
    assert array.dtype == np.dtype(ml_dtypes.bfloat16)
    t = codec.to_torch(array)
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, torch.from_numpy(x).to(torch.bfloat16))
