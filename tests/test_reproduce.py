"""A smoke configuration of ``fedlesion reproduce``: every configuration, tiny data, two rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlesion.common.checkpoint import load_checkpoint
from fedlesion.cli import main

SMOKE = ["--set", "num-server-rounds=2", "--set", "model-args='base_channels=4 depth=2'", "--set", "samples-per-case=4",
         "--set", "batch-size=4", "--set", "local-steps=4"]  # val-fraction stays at its default: reproduce must train the sites on every case


def test_reproduce_smoke(tmp_path: Path) -> None:
    from fedlesion.simulations.synthetic import write_site

    data = tmp_path / "data"
    write_site(data, site=0, cases=6, shape=(32, 32, 16), seed=0)
    out = tmp_path / "repro"
    code = main(["reproduce", "--data", str(data), "--split", "iid", "--sites", "2", "--test-data", str(data),
                 "--test-include", "*_004", "--test-include", "*_005", "--out", str(out), *SMOKE])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"central", "fedavg", "fedprox", "fedadam", "local-site-0", "local-site-1"}
    for name, row in results.items():
        assert {"dice_mean", "dice_std", "iou_mean", "iou_std", "hd95_mean"} <= set(row["summary"]["WT"])
        assert row["rounds"] == 2 and row["total_local_epochs"] == 2 and row["seconds_per_case"] > 0
        # Sites alone are scored once, at the end; the others after every round (server-eval-every 1).
        assert len(row["curve"]) == (1 if name.startswith("local-") else 2), name
    assert results["central"]["train_cases"] == 4 and results["local-site-0"]["train_cases"] == 2
    # The federation trains on the same cases as the pooled run (no validation share held back at the sites),
    # and the pooled and local-only baselines carry no proximal term.
    assert results["fedavg"]["train_cases"] == results["fedprox"]["train_cases"] == results["central"]["train_cases"]
    for name in ("central", "local-site-0", "local-site-1"):
        assert load_checkpoint(out / "runs" / f"{name}.pt").run_config["proximal_mu"] == 0.0
    # Each client sends its model once per round: the fp32 arrays, nothing more.
    assert results["fedavg"]["bytes_sent_per_client_per_round"] > 0
    split = json.loads((out / "split.json").read_text())
    assert not {"Synth_S00_004", "Synth_S00_005"} & {c for cases in split["sites"].values() for c in cases}
    for png in ("curves.png", "overlay.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| fedavg |" in (out / "results.md").read_text()
    facts = json.loads((out / "reproduce.json").read_text())
    assert facts["versions"]["flwr"] and facts["test_cases"] == ["Synth_S00_004", "Synth_S00_005"]


def test_reproduce_over_folds_with_fedbn(tmp_path: Path) -> None:
    """Two-fold cross-validation by site, FedBN through flwr run beside pooled and local-only training."""
    from fedlesion.simulations.synthetic import synthesize

    data = tmp_path / "data"
    synthesize(data, sites=2, cases_per_site=4, shape=(32, 32, 16), seed=0, flat=True)
    out = tmp_path / "cv"
    code = main(["reproduce", "--data", str(data), "--split", "institution", "--folds", "2", "--configs",
                 "central,fedbn,local", "--out", str(out), *SMOKE])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {"central", "fedbn"} <= set(results) and any(name.startswith("local-") for name in results)
    facts = json.loads((out / "reproduce.json").read_text())
    assert facts["repeats"] == ["fold-0", "fold-1"]
    held = [set(facts["test_cases"][fold]) for fold in facts["repeats"]]
    assert not held[0] & held[1] and len(held[0] | held[1]) == len(list(data.glob("Synth_*")))
    for fold in facts["repeats"]:
        per_fold = json.loads((out / fold / "results.json").read_text())
        trained = load_checkpoint(out / fold / "runs" / "fedbn" / "final.pt")
        assert "norm=batch" in trained.run_config["model-args"] and trained.run_config["fedbn"] is True
        assert per_fold["fedbn"]["train_cases"] == per_fold["central"]["train_cases"]
    # Flower kept each site's BatchNorm layers between rounds: round 2 trained with them.
    history = [json.loads(line) for line in (out / "fold-0" / "runs" / "fedbn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["metrics"]["fedbn-own-layers"] for r in history[1]["replies"]] == [1.0, 1.0]
    assert [r["metrics"]["fedbn-own-layers"] for r in history[0]["replies"]] == [0.0, 0.0]
    row = results["fedbn"]
    assert row["repeats"] == 2 and len(row["per_repeat"]) == 2
    folds = [json.loads((out / f / "results.json").read_text())["fedbn"]["summary"]["WT"]["dice_mean"] for f in facts["repeats"]]
    assert row["summary"]["WT"]["dice_mean"] == pytest.approx(sum(folds) / 2)
    assert "2-fold cross-validation" in (out / "results.md").read_text()
    # Per site: every configuration scored on each site's own held-out cases; a site alone on its own only.
    sites = sorted(json.loads((out / "fold-0" / "split.json").read_text())["sites"])
    for name in ("central", "fedbn"):
        assert sorted(results[name]["sites"]) == sites
        for site in sites:
            block = results[name]["sites"][site]
            assert set(block) == {"num_cases", "repeats", "summary"}, "counts and scores, no case IDs"
            assert block["num_cases"] == sum(1 for c in held[0] | held[1] if c.startswith(f"Synth_{site}_"))
            per_fold = [json.loads((out / f / "results.json").read_text())[name]["sites"][site]["summary"]["WT"]["dice_mean"]
                        for f in facts["repeats"]]
            assert block["summary"]["WT"]["dice_mean"] == pytest.approx(sum(per_fold) / 2)
    table = (out / "results.md").read_text()
    assert "Per site" in table and all(f"| {site} |" in table for site in sites)


def test_reproduce_leaves_each_site_out_in_turn(tmp_path: Path) -> None:
    """Generalisation to a hospital that did not take part: each site's cases held out, the others train (pooled
    here, to keep the test short: a federated configuration goes through the same repeats and splits)."""
    from fedlesion.simulations.synthetic import synthesize

    data = tmp_path / "data"
    synthesize(data, sites=3, cases_per_site=3, shape=(32, 32, 16), seed=0, flat=True)
    out = tmp_path / "loio"
    assert main(["reproduce", "--data", str(data), "--split", "institution", "--leave-one-out", "--configs", "central",
                 "--out", str(out), *SMOKE]) == 0
    cases = {site: sorted(p.name for p in data.glob(f"Synth_{site}_*")) for site in ("S00", "S01", "S02")}
    assert all(len(c) >= 2 for c in cases.values()), cases
    left_out = json.loads((out / "left_out.json").read_text())
    assert sorted(left_out) == sorted(cases)
    facts = json.loads((out / "reproduce.json").read_text())
    for site, site_cases in cases.items():
        assert facts["test_cases"][f"out-{site}"] == site_cases and left_out[site]["central"]["num_cases"] == len(site_cases)
        trained_on = json.loads((out / f"out-{site}.split.json").read_text())["sites"]  # what reproduce was given
        assert site not in trained_on and not set(site_cases) & {c for cs in trained_on.values() for c in cs}
        per_run = json.loads((out / f"out-{site}" / "results.json").read_text())["central"]
        assert left_out[site]["central"]["summary"] == per_run["summary"]
        assert per_run["train_cases"] == sum(len(c) for s, c in cases.items() if s != site)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"central"} and results["central"]["repeats"] == 3
    assert "Each site left out in turn" in (out / "results.md").read_text()
