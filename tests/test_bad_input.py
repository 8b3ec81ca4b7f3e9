"""What a careless or hostile user can give the `fedlesion` commands: each is a named error (exit 2), found
before any work starts where it can be, and nothing that existed is overwritten. One table per kind of input;
bad scans and manifests are in test_data.py (per case, the rest of the site still used)."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlesion.common.checkpoint import FORMAT, Checkpoint, load_checkpoint, save_checkpoint
from fedlesion.common.data import LAYOUTS
from fedlesion.common.model import build_model
from fedlesion.cli import main
from tests.conftest import write_case

TINY = "base_channels=4 depth=2"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny data folder, a trained checkpoint, and checkpoints that are wrong in one way each."""
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data"
    for i in range(2):
        write_case(data, f"Case_00{i}", shape=(24, 24, 12), seed=i)
    model = root / "model.pt"
    assert main(["train", "--data", str(data), "--out", str(model), "--model-args", TINY, "--epochs", "1",
                 "--samples-per-case", "2", "--batch-size", "2", "--val-fraction", "0"]) == 0
    good = load_checkpoint(model)
    other = build_model("unet2d", 4, 3, base_channels=8, depth=2).state_dict()  # another model's weights
    save_checkpoint(Checkpoint(good.model, good.model_args, good.spec, other), root / "other-model.pt")
    torch.save({"format": FORMAT, "model": "unet2d", "spec": good.spec.to_json()}, root / "incomplete.pt")
    nan = {k: v.clone() for k, v in good.state_dict.items()}
    next(v for v in nan.values() if v.is_floating_point()).fill_(float("nan"))
    save_checkpoint(Checkpoint(good.model, good.model_args, good.spec, nan), root / "nan.pt")
    two = LAYOUTS["brats2021"].__class__(name="two", channels=dict(list(LAYOUTS["brats2021"].channels.items())[:2]),
                                         label=good.spec.label, labels=good.spec.labels, regions=good.spec.regions)
    declared = {"base_channels": 16, "depth": 4, "norm": "group"}  # the run's model, trained on two channels
    save_checkpoint(Checkpoint("unet2d", declared, two, build_model("unet2d", 2, 3, **declared).state_dict(), round=1),
                    root / "two-channel" / "last.pt")
    (data / "fedlesion.json").write_text('{"layout": "brats2021"}')
    escape = Checkpoint(good.model, good.model_args, good.spec.__class__(**{**good.spec.__dict__, "label": "../{case}_seg.nii.gz"}),
                        good.state_dict)
    save_checkpoint(escape, root / "escape.pt")
    broken = write_case(root / "broken", "Case_009", shape=(24, 24, 12))
    (broken / "Case_009_flair.nii.gz").write_bytes(b"truncated")
    (root / "seg.nii.gz").write_bytes(b"an earlier prediction")
    (root / "metrics.json").write_text("{}")
    (root / "a-folder").mkdir()
    return {"root": root, "data": data, "model": model}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


CASES = [
    # --- settings ---
    ("train-lr-inf", ["train", "--data", "{data}", "--out", "{root}/new.pt", "--learning-rate", "inf"], "must be a finite number"),
    ("train-model-args", ["train", "--data", "{data}", "--out", "{root}/new.pt", "--model-args", "base_channels=abc"],
     "base_channels='abc' must be int"),
    ("train-out-folder", ["train", "--data", "{data}", "--out", "{root}/a-folder"], "is a folder"),
    ("train-out-exists", ["train", "--data", "{data}", "--out", "{model}"], "exists; pass --force"),
    ("train-over-label", ["train", "--data", "{data}", "--out", "{data}/Case_000/Case_000_seg.nii.gz", "--force"],
     "one of this command's inputs"),
    ("train-diverges", ["train", "--data", "{data}", "--out", "{root}/diverged.pt", "--learning-rate", "1e30",
                        "--model-args", TINY, "--epochs", "3", "--samples-per-case", "4", "--batch-size", "2",
                        "--val-fraction", "0"], "training diverged: the loss is (nan|inf)"),
    ("synth-huge", ["synth", "--out", "{root}/synth", "--sites", "1", "--cases-per-site", "1", "--shape", "4000,4000,4000",
                    "--seed", "0"], "must be three integers from 8 to 1024"),
    ("synth-large", ["synth", "--out", "{root}/synth", "--sites", "1", "--cases-per-site", "1", "--shape", "1000,1000,1000",
                     "--seed", "0"], "each side must be <= 512"),
    ("split-fets-none", ["split", "--data", "{data}", "--kind", "fets1", "--out", "{root}/split.json"],
     "none of the 2 case\\(s\\) is a subject of the FeTS partition"),
    ("simulate-rounds-str", ["simulate", "--out", "{root}/sim", "--set", "num-server-rounds=abc"], "has type str"),
    ("simulate-model", ["simulate", "--out", "{root}/sim", "--set", "model='nonsense'"], "unknown model 'nonsense'"),
    ("simulate-epochs", ["simulate", "--out", "{root}/sim", "--set", "local-epochs=-1"], "'local-epochs' = -1 is out of range"),
    ("simulate-batch", ["simulate", "--out", "{root}/sim", "--set", "batch-size=0"], "'batch-size' = 0 is out of range"),
    ("simulate-rounds", ["simulate", "--out", "{root}/sim", "--rounds", "-1"], "'num-server-rounds' = -1 is out of range"),
    ("simulate-lr-nan", ["simulate", "--out", "{root}/sim", "--set", "learning-rate=nan"], "must be a finite number"),
    ("simulate-sites", ["simulate", "--out", "{root}/sim", "--sites", "1"], "can never reach min-available-nodes = 2"),
    ("simulate-strategy", ["simulate", "--out", "{root}/sim", "--set", "strategy='fedsomething'"], "strategy 'fedsomething' is unknown"),
    ("simulate-data-root", ["simulate", "--out", "{root}/sim", "--set", "data-root='{root}/no-such-folder'"],
     "data-root .*no-such-folder is not a folder"),
    ("simulate-split", ["simulate", "--out", "{root}/sim", "--set", "data-root='{data}'", "--set", "split='nonsense'"],
     "split 'nonsense' is neither 'folders', a split kind"),
    ("simulate-server-eval", ["simulate", "--out", "{root}/sim", "--set", "server-eval-data='{root}/missing'"],
     "server-eval-data .*missing is not a folder"),
    ("simulate-resume-channels", ["simulate", "--out", "{root}/sim", "--set", "resume-from='{root}/two-channel/last.pt'"],
     "trained on channels \\['flair', 't1'\\]"),
    # --- outputs ---
    ("predict-over-flair", ["predict", "--checkpoint", "{model}", "--case", "{data}/Case_000",
                            "--out", "{data}/Case_000/Case_000_flair.nii.gz", "--force"], "one of this command's inputs"),
    ("predict-over-label", ["predict", "--checkpoint", "{model}", "--case", "{data}/Case_000",
                            "--out", "{data}/Case_000/Case_000_seg.nii.gz", "--force"], "one of this command's inputs"),
    ("predict-exists", ["predict", "--checkpoint", "{model}", "--case", "{data}/Case_000", "--out", "{root}/seg.nii.gz"],
     "exists; pass --force"),
    ("predict-txt", ["predict", "--checkpoint", "{model}", "--case", "{data}/Case_000", "--out", "{root}/x.txt"],
     "must end in .nii.gz or .nii"),
    ("evaluate-over-checkpoint", ["evaluate", "--checkpoint", "{model}", "--data", "{data}", "--out", "{model}", "--force"],
     "one of this command's inputs"),
    ("evaluate-over-manifest", ["evaluate", "--checkpoint", "{model}", "--data", "{data}", "--out", "{data}/fedlesion.json",
                                "--force"], "one of this command's inputs"),
    ("evaluate-exists", ["evaluate", "--checkpoint", "{model}", "--data", "{data}", "--out", "{root}/metrics.json"],
     "exists; pass --force"),
    ("evaluate-none-scored", ["evaluate", "--checkpoint", "{model}", "--data", "{root}/broken", "--out", "{root}/none.json"],
     "none of 1 case\\(s\\) could be scored; every one was skipped \\(reasons in"),
    # --- checkpoints ---
    ("checkpoint-other-model", ["evaluate", "--checkpoint", "{root}/other-model.pt", "--data", "{data}", "--out", "{root}/o.json"],
     "other-model.pt of unet2d .*weights do not fit"),
    ("checkpoint-incomplete", ["evaluate", "--checkpoint", "{root}/incomplete.pt", "--data", "{data}", "--out", "{root}/i.json"],
     "incomplete.pt: incomplete, it lacks \\['model_args', 'state_dict'\\]"),
    ("checkpoint-nan", ["predict", "--checkpoint", "{root}/nan.pt", "--case", "{data}/Case_000", "--out", "{root}/n.nii.gz"],
     "nan.pt: 1 tensor\\(s\\) hold NaN or Inf"),
    ("checkpoint-pattern-escape", ["predict", "--checkpoint", "{root}/escape.pt", "--case", "{data}/Case_000",
                                   "--out", "{root}/e.nii.gz"], "pattern '../\\{case\\}_seg.nii.gz' must be a relative path"),
    ("checkpoint-missing", ["evaluate", "--checkpoint", "{root}/nothing.pt", "--data", "{data}"], "file not found"),
]


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_named_error_and_nothing_is_overwritten(workspace: dict[str, Path], name: str, argv: list[str],
                                                                message: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = workspace["root"]
    before = _digest(root)
    start = time.monotonic()
    code = main([arg.format(**{k: str(v) for k, v in workspace.items()}) for arg in argv])
    error = capsys.readouterr().err
    assert code == 2, error
    assert re.search(message, error), error
    assert "Traceback" not in error
    after = _digest(root)
    assert {k: v for k, v in after.items() if k in before} == before, "an existing file changed"
    if argv[0] == "simulate":  # refused before any SuperLink or simulation starts
        assert time.monotonic() - start < 15 and not any((root / "sim").glob("*/final.pt"))


def test_ctrl_c_during_train_is_a_message_not_a_traceback(workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import fedlesion.common.api

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(fedlesion.common.api, "train_centralized", interrupted)
    assert main(["train", "--data", str(workspace["data"]), "--out", str(workspace["root"] / "ctrl-c.pt")]) == 130
    error = capsys.readouterr().err
    assert "interrupted" in error and "Traceback" not in error


def test_force_replaces_an_output_that_is_not_an_input(workspace: dict[str, Path]) -> None:
    root = workspace["root"]
    (root / "again.json").write_text("{}")
    assert main(["evaluate", "--checkpoint", str(workspace["model"]), "--data", str(workspace["data"]),
                 "--out", str(root / "again.json"), "--force"]) == 0
    assert "summary" in (root / "again.json").read_text()
    assert np.isfinite(next(iter(load_checkpoint(workspace["model"]).state_dict.values())).float().numpy()).all()
