"""What leaves a site: the model's arrays and scalar metrics, nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlesion.client import app as client_app
from fedlesion.common.model import build_model

RUN_CONFIG = {"model": "unet2d", "model-args": "base_channels=4 depth=2", "dataset": "brats2021", "seed": 0,
              "val-fraction": 0.34, "samples-per-case": 4, "batch-size": 4, "local-epochs": 1, "learning-rate": 1e-3}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Messages are stamped with the running task's identity; outside a SuperNode the test provides one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1


def _reply(handler, data_path: Path, message_type: str) -> Message:  # noqa: ANN001
    model = build_model("unet2d", 4, 3, base_channels=4, depth=2)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    msg = Message(content=content, dst_node_id=7, message_type=message_type)
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(data_path), "site-name": "hospital-x"},
                      state=RecordDict(), run_config=RUN_CONFIG)
    return handler(msg, context)


def _strings(value: object) -> list[str]:
    return [value] if isinstance(value, str) else []


def test_replies_hold_only_arrays_and_scalar_metrics(tiny_sites: Path) -> None:
    data = tiny_sites / "site-1"
    case_ids = [p.name for p in data.glob("Synth_*")]
    expected_keys = list(build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict())
    for handler, kind in ((client_app.train, "train"), (client_app.evaluate, "evaluate")):
        reply = _reply(handler, data, kind)
        content = reply.content
        if kind == "train":
            assert not content.config_records, "no free-form config leaves the site"
        else:  # the one string a site sends: its own name, for per-site scores
            assert {k: dict(v) for k, v in content.config_records.items()} == {"site": {"name": "hospital-x"}}
        if kind == "train":
            assert list(content.array_records) == ["arrays"]
            arrays = content.array_records["arrays"]
            assert list(arrays) == expected_keys, "only the model's own tensors"
            for key, array in arrays.items():
                assert array.numpy().shape == tuple(build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict()[key].shape)
        else:
            assert not content.array_records
        for record in content.metric_records.values():
            assert isinstance(record, MetricRecord)
            for key, value in record.items():
                assert isinstance(value, (int, float)), f"{key} is not a scalar"
                assert not any(case in key for case in case_ids) and str(data) not in key
        serialized = repr(content.metric_records)
        assert not any(case in serialized for case in case_ids) and str(data) not in serialized


def test_trained_arrays_are_finite(tiny_sites: Path) -> None:
    reply = _reply(client_app.train, tiny_sites / "site-1", "train")
    arrays = reply.content.array_records["arrays"].to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in arrays.values() if v.is_floating_point())
    assert reply.content.metric_records["metrics"]["num-examples"] == 2
    assert np.isfinite(reply.content.metric_records["metrics"]["train-loss"])


def test_a_site_without_a_chosen_name_sends_none(tiny_sites: Path) -> None:
    """Without `site-name` a site's label is its data folder's name: part of a path, so it is not sent."""
    model = build_model("unet2d", 4, 3, base_channels=4, depth=2)
    msg = Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="evaluate")
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(tiny_sites / "site-1")}, state=RecordDict(),
                      run_config=RUN_CONFIG)
    reply = client_app.evaluate(msg, context)
    assert not reply.content.config_records and "site-1" not in repr(reply.content)
