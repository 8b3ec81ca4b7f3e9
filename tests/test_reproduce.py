"""A smoke configuration of ``fedlesion reproduce``: every configuration, tiny data, two rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import torch

from fedlesion.common.api import evaluate_checkpoint
from fedlesion.common.checkpoint import load_checkpoint
from fedlesion.common.data import divide_cases, load_site
from fedlesion.common.model import batchnorm_keys
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
    # A federated run keeps no best.pt: the server chose it on the held-out cases.
    assert (out / "runs" / "fedavg" / "final.pt").exists() and not list((out / "runs").glob("*/best.pt"))
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
                 "central,fedbn,local", "--out", str(out), *SMOKE, "--set", "finetune-epochs=1"])
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
    # Each site's own models: FedBN's (the final global model with the site's own BatchNorm layers) and the
    # fine-tuned one, each scored on its own site's held-out cases only.
    for name in ("fedbn-personal", "fedbn-finetuned"):
        assert sorted(results[name]["sites"]) == sites and f"| {name} |" in table
        assert results[name]["repeats"] == 2
        for site in sites:
            assert results[name]["sites"][site]["num_cases"] == results["fedbn"]["sites"][site]["num_cases"]
    bn = batchnorm_keys(load_checkpoint(out / "fold-0" / "runs" / "fedbn" / "final.pt").build())
    final = load_checkpoint(out / "fold-0" / "runs" / "fedbn" / "final.pt").state_dict
    fold0 = json.loads((out / "fold-0" / "results.json").read_text())
    for site in sites:
        [kept] = (out / "fold-0" / "runs" / "fedbn" / "personal").glob(f"{site}-node*-run*.fedbn.pt")
        own = load_checkpoint(kept).state_dict
        composed = load_checkpoint(out / "fold-0" / "runs" / "fedbn-personal" / f"{site}.pt").state_dict
        assert all(torch.equal(composed[k], own[k]) for k in bn), "the site's own BatchNorm layers"
        assert all(torch.equal(composed[k], final[k]) for k in final if k not in bn), "the global model's other layers"
        assert any(not torch.equal(own[k], final[k]) for k in bn if k.endswith("running_mean"))
        held_here = sorted(c for c in facts["test_cases"]["fold-0"] if c.startswith(f"Synth_{site}_"))
        again = evaluate_checkpoint(out / "fold-0" / "runs" / "fedbn-personal" / f"{site}.pt", data, include=held_here,
                                    report=lambda _: None)
        assert fold0["fedbn-personal"]["sites"][site]["summary"]["WT"]["dice_mean"] == pytest.approx(
            again["summary"]["WT"]["dice_mean"])


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


def test_semi_supervised_study_synthetic(tmp_path: Path) -> None:
    """The FixMatch experiment in seconds: FedAvg and pooled training on the labels each site keeps, with FixMatch on
    the other cases, and on every label; the same labels kept by the federation and the pooled run."""
    from fedlesion.simulations.synthetic import synthesize

    data = tmp_path / "data"
    synthesize(data, sites=2, cases_per_site=4, shape=(32, 32, 16), seed=0, flat=True)
    out = tmp_path / "semi"
    assert main(["reproduce", "--data", str(data), "--split", "institution", "--test-data", str(data), "--test-include",
                 "*_003", "--configs", "central,fedavg", "--semi-supervised-study", "--out", str(out), *SMOKE,
                 "--set", "label-fraction=0.4", "--set", "fixmatch-threshold=0.6"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {f"{c}-{v}" for c in ("central", "fedavg") for v in ("labelled", "fixmatch", "full")}
    sizes = [len(cases) for cases in json.loads((out / "labelled" / "split.json").read_text())["sites"].values()]
    kept = [max(1, round(0.4 * n)) for n in sizes]  # each site keeps round(0.4 n) labels, at least one
    assert sum(kept) < sum(sizes)
    for config in ("central", "fedavg"):
        labelled, fixmatch, full = (results[f"{config}-{v}"] for v in ("labelled", "fixmatch", "full"))
        assert labelled["train_cases"] == fixmatch["train_cases"] == sum(kept) and full["train_cases"] == sum(sizes), config
        assert fixmatch["unlabelled_cases"] == sum(sizes) - sum(kept)
        assert labelled["unlabelled_cases"] == full["unlabelled_cases"] == 0
    fixmatch_run = [json.loads(line) for line in (out / "fixmatch" / "runs" / "fedavg" / "metrics.jsonl").read_text().splitlines()]
    replies = [reply["metrics"] for reply in fixmatch_run[0]["replies"]]
    assert sorted(m["unlabelled-cases"] for m in replies) == sorted(float(n - k) for n, k in zip(sizes, kept))
    assert all(0.0 <= m["unlabelled-confident"] <= 1.0 for m in replies)
    # The pooled runs keep exactly the labels the sites keep: those the site's own division draws (client.site.load
    # calls divide_cases with the site's usable cases, the run's seed and the site's name), as many per site as
    # each site's replies say it trained on.
    split = json.loads((out / "labelled" / "split.json").read_text())["sites"]
    site_train = {site: [c.case for c in divide_cases(load_site(data, case_ids=cases, cache=None).cases, 0.0, 0.4, 0, site)[0]]
                  for site, cases in split.items()}
    for variant in ("labelled", "fixmatch"):
        pooled = json.loads((out / variant / "runs" / "central.pt.cases.json").read_text())["train"]
        assert sorted(pooled) == sorted(c for cases in site_train.values() for c in cases), variant
    assert sorted(m["labelled-cases"] for m in replies) == sorted(float(len(c)) for c in site_train.values())
    assert load_checkpoint(out / "labelled" / "runs" / "central.pt").run_config["unlabelled-case-count"] == 0
    gains = json.loads((out / "semi_supervised.json").read_text())
    assert set(gains) == {"central", "fedavg"}
    for config, row in gains.items():
        assert set(row["change"]) == {"WT", "TC", "ET"}
        assert row["change"]["ET"] == pytest.approx(results[f"{config}-fixmatch"]["summary"]["ET"]["dice_mean"]
                                                    - results[f"{config}-labelled"]["summary"]["ET"]["dice_mean"])
    assert gains["fedavg"]["labelled"] == pytest.approx(
        sum(results["fedavg-labelled"]["summary"][r]["dice_mean"] for r in ("WT", "TC", "ET")) / 3)
    assert "gap recovered" in (out / "results.md").read_text()
