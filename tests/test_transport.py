"""What a site uploads: its model in float32, or its update in float16 at about half the bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedlesion.client import app as client_app
from fedlesion.client.app import encode_update
from fedlesion.common.model import build_model
from fedlesion.common.privacy import update_norm
from fedlesion.server.strategy import decode_update

RUN_CONFIG = {"model": "unet2d", "model-args": "base_channels=4 depth=2", "dataset": "brats2021", "seed": 0,
              "val-fraction": 0.34, "samples-per-case": 4, "batch-size": 4, "local-epochs": 1, "learning-rate": 1e-3}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1


def _numpy(state: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def test_float16_update_keeps_a_small_update_that_float16_weights_lose() -> None:
    """A late-round update (std 1e-5) on weights of magnitude about 1."""
    rng = np.random.default_rng(0)
    sent = {"w": (rng.choice([-1.0, 1.0], 50_000) * rng.uniform(0.5, 1.5, 50_000)).astype(np.float32)}
    update = rng.normal(0.0, 1e-5, 50_000).astype(np.float32)
    trained = {"w": sent["w"] + update}
    exact = trained["w"] - sent["w"]  # the update as float32 holds it

    def relative_error(received: np.ndarray) -> float:
        return float(np.linalg.norm(received - sent["w"] - exact) / np.linalg.norm(exact))

    uploaded = encode_update(trained, sent, "float16")
    assert uploaded["w"].dtype == np.float16
    assert relative_error(decode_update(uploaded, sent)["w"]) < 0.01
    assert relative_error(trained["w"].astype(np.float16).astype(np.float32)) > 1.0, "float16 weights drown the update"


def test_float16_transport_halves_the_upload_of_the_full_size_model() -> None:
    sent = _numpy(build_model("unet2d", 4, 3, norm="batch").state_dict())  # BatchNorm: integer counters too
    trained = {k: np.asarray(v + 1e-3 if v.dtype.kind == "f" else v + 1, v.dtype) for k, v in sent.items()}
    fp32_size = sum(v.nbytes for v in sent.values() if v.dtype.kind == "f")

    def uploaded_bytes(dtype: str) -> int:
        return sum(len(Array(v).data) for v in encode_update(trained, sent, dtype).values())

    full, half = uploaded_bytes("float32"), uploaded_bytes("float16")
    assert full <= 1.05 * fp32_size
    assert half <= 0.55 * fp32_size
    uploaded = encode_update(trained, sent, "float16")
    assert uploaded["inc.block.1.num_batches_tracked"].dtype == np.int64, "counters travel as they are"
    decoded = decode_update(uploaded, sent)
    assert all(decoded[k].dtype == v.dtype for k, v in sent.items())
    np.testing.assert_allclose(decoded["outc.weight"], trained["outc.weight"], atol=1e-6)


def test_unknown_transport_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="transport-dtype 'bfloat8'"):
        encode_update({"w": np.zeros(2, np.float32)}, {"w": np.zeros(2, np.float32)}, "bfloat8")


def test_site_clips_in_float32_then_uploads_the_clipped_update_in_float16(tiny_sites: Path) -> None:
    """Through the ClientApp and its mods: clipping sees float32 weights, the float16 upload carries the clipped update."""
    sent = build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict()
    config = ConfigRecord({"server-round": 1, KEY_CLIPPING_NORM: 0.05})
    msg = Message(content=RecordDict({"arrays": ArrayRecord(sent), "config": config}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(tiny_sites / "site-1"), "site-name": "hospital-x"},
                      state=RecordDict(), run_config={**RUN_CONFIG, "dp": "client-fixed", "transport-dtype": "float16"})
    reply = client_app.app(msg, context)
    assert not reply.has_error(), reply.error
    uploaded = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert {v.dtype for k, v in uploaded.items() if not k.endswith("num_batches_tracked")} == {np.dtype(np.float16)}
    assert reply.content["metrics"][KEY_NORM_BIT] == 1, "training moves the weights by more than 0.05"
    assert update_norm(decode_update(uploaded, _numpy(sent)), _numpy(sent)) == pytest.approx(0.05, rel=2e-3)
    assert reply.content["metrics"]["update-bytes"] == sum(len(a.data) for a in reply.content["arrays"].values())
