"""What a site uploads: the model's arrays in float32, or float16 at about half the bytes."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from client.app import transport_state
from common.model import build_model


def _bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def test_float16_transport_halves_the_upload_of_the_default_model() -> None:
    state = build_model("unet2d", 4, 3).state_dict()
    fp32_size = sum(v.numel() * v.element_size() for v in state.values() if v.is_floating_point())
    full = _bytes(ArrayRecord(transport_state(state, "float32")))
    half = _bytes(ArrayRecord(transport_state(state, "float16")))
    assert full <= 1.05 * fp32_size
    assert half <= 0.55 * fp32_size
    restored = ArrayRecord(transport_state(state, "float16")).to_torch_state_dict()
    model = build_model("unet2d", 4, 3)
    model.load_state_dict(restored)  # float16 arrays load into the float32 model
    assert next(model.parameters()).dtype == torch.float32
    assert restored["inc.block.1.num_batches_tracked"].dtype == torch.int64


def test_unknown_transport_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="transport-dtype 'bfloat8'"):
        transport_state({"w": torch.zeros(2)}, "bfloat8")
