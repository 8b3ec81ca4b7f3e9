"""FedBN: each site keeps its own BatchNorm layers; only the other layers come from the global model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedlesion.client import app as client_app
from fedlesion.client import site as sites
from fedlesion.common.model import batchnorm_keys, build_model
from fedlesion.server.app import check_fedbn

ARGS = "base_channels=4 depth=2 norm=batch"
RUN_CONFIG = {"model": "unet2d", "model-args": ARGS, "dataset": "brats2021", "seed": 0, "val-fraction": 0.34,
              "samples-per-case": 4, "batch-size": 4, "local-epochs": 1, "local-steps": 2, "learning-rate": 1e-2,
              "fedbn": True}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1


def _global() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("unet2d", 4, 3, base_channels=4, depth=2, norm="batch").state_dict()


def _train(context: Context, arrays: dict[str, torch.Tensor], server_round: int) -> dict[str, np.ndarray]:
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": server_round})})
    reply = client_app.train(Message(content=content, dst_node_id=7, message_type="train"), context)
    assert not reply.has_error()
    return {key: array.numpy() for key, array in reply.content["arrays"].items()}


def _context(data: Path, run_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config={"data-path": str(data), "site-name": "hospital-x"},
                   state=RecordDict(), run_config=run_config)


def test_batchnorm_keys_are_the_batchnorm_layers_only() -> None:
    model = build_model("unet2d", 4, 3, base_channels=4, depth=2, norm="batch")
    keys = batchnorm_keys(model)
    assert keys and all(k.rsplit(".", 1)[1] in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                        for k in keys)
    convs = [k for k in model.state_dict() if k not in keys]
    assert all(model.state_dict()[k].dim() >= 2 or "bias" in k for k in convs), "conv weights stay shared"
    assert batchnorm_keys(build_model("unet2d", 4, 3, base_channels=4, depth=2)) == [], "GroupNorm has none"


def test_a_site_trains_its_own_batchnorm_layers_not_the_global_ones(tiny_sites: Path) -> None:
    context = _context(tiny_sites / "site-1", RUN_CONFIG)
    first = _train(context, _global(), 1)
    stored = context.state[client_app.FEDBN_STATE].to_torch_state_dict()
    bn = batchnorm_keys(build_model("unet2d", 4, 3, base_channels=4, depth=2, norm="batch"))
    assert set(stored) == set(bn)
    for key in bn:
        np.testing.assert_array_equal(stored[key].numpy(), first[key])

    # The server's next global model: other sites moved the shared layers and the averaged BatchNorm.
    next_global = {key: torch.as_tensor(value).clone() for key, value in first.items()}
    for key in next_global:
        if key.endswith(("running_var", "weight")) and key in bn:
            next_global[key] = next_global[key] * 5 + 1
        elif next_global[key].is_floating_point():
            next_global[key] = next_global[key] + 0.01
    site = sites.load(context.node_config, context.run_config)
    model, _, _ = client_app._model(context, site, ArrayRecord(next_global))
    state = model.state_dict()
    for key, value in state.items():
        expected = stored[key] if key in bn else next_global[key]
        torch.testing.assert_close(value.cpu(), expected, msg=f"{key}: {'own' if key in bn else 'global'} layer expected")

    second = _train(context, next_global, 2)
    restored = context.state[client_app.FEDBN_STATE].to_torch_state_dict()
    changed = [k for k in bn if k.endswith("running_mean") and not np.allclose(restored[k].numpy(), stored[k].numpy())]
    assert changed, "round 2 trained the site's BatchNorm further"
    for key in bn:
        np.testing.assert_array_equal(restored[key].numpy(), second[key])


def test_a_restarted_supernode_restores_the_sites_layers_from_its_disk(tiny_sites: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With a personal folder, the site's BatchNorm layers outlive the SuperNode's memory: a new process with an
    empty context.state (a restarted SuperNode) loads them from the site's disk; another run does not."""
    monkeypatch.delenv(client_app.PERSONAL_DIR_ENV, raising=False)
    node = {"data-path": str(tiny_sites / "site-1"), "site-name": "hospital x", "personal-dir": str(tmp_path / "own")}
    first = _train(Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=RUN_CONFIG), _global(), 1)
    [kept] = (tmp_path / "own").iterdir()
    assert kept.name == "hospital_x-node7-run1.fedbn.pt" and kept.stat().st_mode & 0o777 == 0o600
    bn = batchnorm_keys(build_model("unet2d", 4, 3, base_channels=4, depth=2, norm="batch"))
    next_global = {k: v * 3 + 1 if v.is_floating_point() else v for k, v in _global().items()}

    sites._SITES.clear()  # a new process: nothing of the first one in memory
    fresh = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=RUN_CONFIG)
    model, _, own = client_app._model(fresh, sites.load(fresh.node_config, fresh.run_config), ArrayRecord(next_global))
    assert own
    for key, value in model.state_dict().items():
        expected = torch.as_tensor(first[key]) if key in bn else next_global[key]
        torch.testing.assert_close(value.cpu(), expected, msg=f"{key}: {'own' if key in bn else 'global'} layer expected")
    content = RecordDict({"arrays": ArrayRecord(next_global), "config": ConfigRecord({"server-round": 2})})
    second = client_app.train(Message(content=content, dst_node_id=7, message_type="train"), fresh)
    assert second.content["metrics"]["fedbn-own-layers"] == 1.0

    other_run = Context(run_id=2, node_id=7, node_config=node, state=RecordDict(), run_config=RUN_CONFIG)
    model, _, own = client_app._model(other_run, sites.load(node, RUN_CONFIG), ArrayRecord(next_global))
    assert not own and all(torch.equal(model.state_dict()[k].cpu(), next_global[k]) for k in bn)

    # Layers of another model on the disk are refused, naming the file, not loaded.
    other = {**RUN_CONFIG, "model-args": "base_channels=8 depth=2 norm=batch"}
    with pytest.raises(ValueError, match="hospital_x-node7-run1.fedbn.pt"):
        client_app._model(Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=other),
                          sites.load(node, other), ArrayRecord(build_model("unet2d", 4, 3, base_channels=8, depth=2,
                                                                           norm="batch").state_dict()))


def test_without_fedbn_the_global_batchnorm_layers_are_loaded(tiny_sites: Path) -> None:
    context = _context(tiny_sites / "site-1", {**RUN_CONFIG, "fedbn": False})
    _train(context, _global(), 1)
    assert client_app.FEDBN_STATE not in context.state
    # Even with layers stored (a run that had fedbn on), fedbn off loads the global ones.
    bn = batchnorm_keys(build_model("unet2d", 4, 3, base_channels=4, depth=2, norm="batch"))
    context.state[client_app.FEDBN_STATE] = ArrayRecord({k: v + 3 if v.is_floating_point() else v
                                                         for k, v in _global().items() if k in bn})
    glob = {key: value * 2 if value.is_floating_point() else value for key, value in _global().items()}
    model, _, _ = client_app._model(context, sites.load(context.node_config, context.run_config), ArrayRecord(glob))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value.cpu(), glob[key])


def _evaluate(context: Context, arrays: dict[str, torch.Tensor]) -> dict[str, float]:
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": 1})})
    reply = client_app.evaluate(Message(content=content, dst_node_id=7, message_type="evaluate"), context)
    assert not reply.has_error()
    return dict(reply.content["metrics"])


def test_a_site_validates_with_its_own_batchnorm_layers(tiny_sites: Path) -> None:
    """The site's validation scores its own model: the stored BatchNorm layers, not the global ones."""
    bn = batchnorm_keys(build_model("unet2d", 4, 3, base_channels=4, depth=2, norm="batch"))
    glob = _global()
    # Own layers that silence every feature map: a constant output, unlike the global model's.
    own = {k: torch.zeros_like(v) if k.endswith(("weight", "running_mean")) else
           (torch.full_like(v, -50.0) if k.endswith("bias") else v) for k, v in glob.items() if k in bn}
    scores = {}
    for fedbn in (True, False):
        context = _context(tiny_sites / "site-1", {**RUN_CONFIG, "fedbn": fedbn})
        context.state[client_app.FEDBN_STATE] = ArrayRecord(own)
        scores[fedbn] = _evaluate(context, glob)
    assert scores[True] != scores[False]
    # Exactly the global model with the site's own layers in place of its BatchNorm ones: no more, no fewer.
    plain = _context(tiny_sites / "site-1", {**RUN_CONFIG, "fedbn": False})
    assert scores[True] == _evaluate(plain, {**glob, **own})


def test_the_train_reply_says_whether_the_site_used_its_own_layers(tiny_sites: Path) -> None:
    context = _context(tiny_sites / "site-1", RUN_CONFIG)
    content = RecordDict({"arrays": ArrayRecord(_global()), "config": ConfigRecord({"server-round": 1})})
    first = client_app.train(Message(content=content, dst_node_id=7, message_type="train"), context)
    assert first.content["metrics"]["fedbn-own-layers"] == 0.0
    content = RecordDict({"arrays": ArrayRecord(_global()), "config": ConfigRecord({"server-round": 2})})
    second = client_app.train(Message(content=content, dst_node_id=7, message_type="train"), context)
    assert second.content["metrics"]["fedbn-own-layers"] == 1.0
    off = _context(tiny_sites / "site-1", {**RUN_CONFIG, "fedbn": False})
    content = RecordDict({"arrays": ArrayRecord(_global()), "config": ConfigRecord({"server-round": 1})})
    assert "fedbn-own-layers" not in client_app.train(Message(content=content, dst_node_id=7, message_type="train"),
                                                      off).content["metrics"]


def test_the_server_refuses_fedbn_without_batchnorm_with_dp_or_float16() -> None:
    group = build_model("unet2d", 4, 3, base_channels=4, depth=2)
    batch = build_model("unet2d", 4, 3, base_channels=4, depth=2, norm="batch")
    ok = {"fedbn": True, "model-args": ARGS, "dp": "none", "transport-dtype": "float32"}
    with pytest.raises(ValueError, match="norm=batch"):
        check_fedbn({**ok, "model-args": "base_channels=4 depth=2"}, group, "unet2d")
    with pytest.raises(ValueError, match="dp"):
        check_fedbn({**ok, "dp": "server-fixed"}, batch, "unet2d")
    with pytest.raises(ValueError, match="float32"):
        check_fedbn({**ok, "transport-dtype": "float16"}, batch, "unet2d")
    check_fedbn({**ok, "fedbn": False}, group, "unet2d")
    check_fedbn(ok, batch, "unet2d")


def test_the_server_app_checks_fedbn_before_the_run(tmp_path: Path) -> None:
    """The ServerApp refuses fedbn on a GroupNorm model before anything is written."""
    from flwr.app import Context as AppContext

    from fedlesion.server import app as server_app

    context = AppContext(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                         run_config={"fedbn": True, "model-args": "base_channels=4 depth=2",
                                     "output-dir": str(tmp_path), "run-name": "x"})
    with pytest.raises(ValueError, match="norm=batch"):
        server_app.main(None, context)
    assert not (tmp_path / "x").exists()
