"""Tensors on the wire are safetensors files: the ones Djinn writes are byte for byte what the safetensors
library writes, and the library reads them back."""
import pytest
import torch
from safetensors.torch import load, save

from djinn.errors import InvalidRequest
from djinn.wire import WIRE_DTYPES, pack, tensor_to_bytes, unpack


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES, key=str))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 5, 7), (1, 0, 4)])
def test_written_as_the_library_writes(dtype, shape):
    t = (torch.randn(shape) * 10).to(dtype)
    data = tensor_to_bytes(t)
    assert data == save({"t": t})
    back = load(data)["t"]
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_views_and_frames():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    for view in (x[:, ::2], x.t(), x[1:3]):  # strided, transposed, offset into its storage
        assert torch.equal(load(tensor_to_bytes(view))["t"], view)
    frame = unpack(pack({"type": "paused", "activation": x.t()}))
    assert frame["activation"].dtype == torch.bfloat16 and torch.equal(frame["activation"], x.t())
    with pytest.raises(InvalidRequest, match="not accepted on the wire"):
        pack({"activation": torch.zeros(2, dtype=torch.complex64)})
