"""Cross-validation folds and the mean ± spread over folds or seeds of `fedlesion reproduce`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlesion.common.splits import Split
from fedlesion.simulations.reproduce import (
    ALL_CONFIGS,
    _fedbn_model_args,
    aggregate_repeats,
    fold_test_cases,
    mean_dice,
    per_site_markdown,
    per_site_table,
    reproduce,
    reproduce_repeated,
    results_markdown,
)
from fedlesion.common.config import with_defaults

SPLIT = Split("institution", {"CBICA": [f"C{i}" for i in range(10)], "2013": [f"B{i}" for i in range(4)],
                              "TCIA02": ["T0", "T1", "T2"], "TCIA10": ["U0", "U1", "U2"]})


def test_every_case_is_held_out_once_and_every_fold_holds_out_every_site() -> None:
    folds = fold_test_cases(SPLIT, 3, seed=0)
    held = [case for fold in folds for case in fold]
    assert sorted(held) == sorted(c for cases in SPLIT.sites.values() for c in cases), "each case held out exactly once"
    for fold in folds:
        for site, cases in SPLIT.sites.items():
            assert any(c in cases for c in fold), f"a fold without a {site} case"
            assert len([c for c in cases if c not in fold]) >= 2, f"{site} keeps training cases"
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1, f"folds balanced in size, got {sizes}"
    assert fold_test_cases(SPLIT, 3, seed=0) == folds, "the same seed gives the same folds"
    assert fold_test_cases(SPLIT, 3, seed=1) != folds, "another seed shuffles"


def test_folds_refuse_too_few_folds_or_a_one_case_site() -> None:
    with pytest.raises(ValueError, match="at least 2 folds"):
        fold_test_cases(SPLIT, 1, seed=0)
    with pytest.raises(ValueError, match="fewer than 2 cases"):
        fold_test_cases(Split("institution", {"A": ["a0", "a1"], "B": ["b0"]}), 2, seed=0)


def _run(dice: dict[str, float], curve: list[tuple[int, float]], cases: int) -> dict:
    summary = {r: {f"{m}_{s}": (d if m == "dice" else 0.5) for m in ("dice", "iou", "hd95", "sensitivity", "specificity")
                   for s in ("mean", "std")} for r, d in dice.items()}
    return {"summary": summary, "train_cases": cases, "seconds_per_case": 1.0, "rounds": 2, "local_epochs": 1,
            "total_local_epochs": 2, "wall_seconds": 10.0, "curve": curve, "bytes_sent_per_client_per_round": None}


def test_aggregate_is_the_mean_and_sample_spread_over_repeats() -> None:
    repeats = [
        {"central": _run({"WT": 0.9, "TC": 0.8}, [(1, 0.5), (2, 0.9)], 13),
         "fedavg": _run({"WT": 0.7, "TC": 0.6}, [(1, 0.4), (2, 0.7)], 13)},
        {"central": _run({"WT": 0.8, "TC": 0.6}, [(1, 0.3), (2, 0.8)], 14),
         "fedavg": _run({"WT": 0.9, "TC": 0.8}, [(1, 0.6), (2, 0.9)], 14), "local-A": _run({"WT": 0.1, "TC": 0.1}, [], 3)},
    ]
    results = aggregate_repeats(repeats, ["WT", "TC"])
    assert set(results) == {"central", "fedavg"}, "a configuration missing from a repeat is left out"
    wt = results["central"]["summary"]["WT"]
    assert wt["dice_mean"] == pytest.approx(0.85)
    assert wt["dice_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1)), "spread over repeats, not over cases"
    assert results["central"]["mean_dice"] == pytest.approx(np.mean([0.85, 0.7]))
    assert results["central"]["mean_dice_std"] == pytest.approx(np.std([0.85, 0.7], ddof=1))
    assert results["fedavg"]["curve"] == [(1, pytest.approx(0.5)), (2, pytest.approx(0.8))]
    assert results["central"]["train_cases"] == [13, 14]
    table = results_markdown(results, ["WT", "TC"], caption="3 folds")
    assert "| central | 13/14 | 0.850 ± 0.071" in table and "0.775 ± 0.106" in table
    assert mean_dice(repeats[0]["central"]["summary"]) == pytest.approx(0.85)


def test_fedbn_runs_the_same_model_with_batchnorm_and_unknown_configs_are_refused(tmp_path) -> None:  # noqa: ANN001
    assert "fedbn" in ALL_CONFIGS and "fedyogi" in ALL_CONFIGS and "krum" in ALL_CONFIGS
    args = _fedbn_model_args(with_defaults({"model-args": "base_channels=16 depth=4"}))
    assert args == "base_channels=16 depth=4 norm=batch"
    with pytest.raises(ValueError, match="takes no argument"):
        _fedbn_model_args(with_defaults({"model": "unet3d", "model-args": ""}))
    with pytest.raises(ValueError, match="unknown reproduce configuration"):
        reproduce(tmp_path, "iid", tmp_path, tmp_path / "out", configs=["central", "fedsgd"])


def test_reproduce_refuses_a_federation_where_sites_sit_rounds_out(tmp_path) -> None:  # noqa: ANN001
    """The pooled run takes every site's steps each round: with fraction-train < 1 it would get more than FedAvg."""
    with pytest.raises(ValueError, match="fraction-train 0.5: reproduce compares"):
        reproduce(tmp_path, "iid", tmp_path, tmp_path / "out", run_config={"fraction-train": 0.5})


def test_repeats_already_done_are_read_not_rerun(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """An interrupted cross-validation continues: finished folds are read from their results.json."""
    import json

    import fedlesion.simulations.reproduce as module
    from fedlesion.simulations.synthetic import synthesize

    data = tmp_path / "data"
    synthesize(data, sites=2, cases_per_site=4, shape=(16, 16, 8), seed=0, flat=True)
    ran: list[str] = []

    def fake(data, split, test_folder, out, **kwargs):  # noqa: ANN001, ANN202
        ran.append(out.name)
        return {"central": _run({"WT": 0.5 + 0.1 * len(ran), "TC": 0.5, "ET": 0.5}, [(2, 0.5)], 3)}

    monkeypatch.setattr(module, "reproduce", fake)
    (tmp_path / "cv" / "fold-0").mkdir(parents=True)
    (tmp_path / "cv" / "fold-0" / "results.json").write_text(json.dumps(
        {"central": _run({"WT": 0.9, "TC": 0.5, "ET": 0.5}, [(2, 0.5)], 3)}))
    results = module.reproduce_repeated(data, "institution", tmp_path / "cv", folds=2, configs=["central"],
                                        report=lambda _: None)
    assert ran == ["fold-1"], "fold-0 was read, only fold-1 ran"
    assert results["central"]["summary"]["WT"]["dice_mean"] == pytest.approx((0.9 + 0.6) / 2)
    with pytest.raises(ValueError, match="already holds"):
        module.reproduce_repeated(data, "institution", tmp_path / "cv", folds=2, configs=["central"])


def _sites(dice_by_site: dict[str, float], cases: int = 2) -> dict:
    return {site: {"num_cases": cases, "summary": _run({"WT": d}, [], 0)["summary"]} for site, d in dice_by_site.items()}


def test_per_site_scores_aggregate_over_repeats_and_a_site_alone_counts_only_at_home() -> None:
    repeats = []
    for a, b in ((0.9, 0.5), (0.7, 0.3)):
        fed = _run({"WT": 0.6}, [], 8)
        fed["sites"] = _sites({"A": a, "B": b})
        alone_a = _run({"WT": 0.4}, [], 4)
        alone_a["sites"] = _sites({"A": 0.8, "B": 0.1})  # A's own model on B's cases: not B's number
        alone_b = _run({"WT": 0.4}, [], 4)
        alone_b["sites"] = _sites({"A": 0.2, "B": 0.6})
        repeats.append({"fedavg": fed, "local-A": alone_a, "local-B": alone_b})
    results = aggregate_repeats(repeats, ["WT"])
    a = results["fedavg"]["sites"]["A"]
    assert a["num_cases"] == 4 and a["summary"]["WT"]["dice_mean"] == pytest.approx(0.8)
    assert a["summary"]["WT"]["dice_std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert results["fedavg"]["worst_site"] == {"site": "B", "region": "WT", "dice_mean": pytest.approx(0.4)}
    table = per_site_table(results)
    assert table["A"]["local"]["summary"]["WT"]["dice_mean"] == pytest.approx(0.8)
    assert table["B"]["local"]["summary"]["WT"]["dice_mean"] == pytest.approx(0.6)
    lines = "\n".join(per_site_markdown(results, ["WT"]))
    assert "| A | 4 | 0.800 ± 0.141 | 0.800 ± 0.000 |" in lines and "| B | 4 | 0.400 ± 0.141 | 0.600 ± 0.000 |" in lines
    assert "fedavg B 0.400" in lines


def test_a_site_missing_from_a_fold_is_still_reported_and_seeds_do_not_add_up_cases() -> None:
    first, second = _run({"WT": 0.6}, [], 8), _run({"WT": 0.6}, [], 8)
    first["sites"] = _sites({"A": 0.8, "C": 0.1}, cases=1)
    second["sites"] = _sites({"A": 0.6}, cases=1)  # C had no held-out case in this fold
    results = aggregate_repeats([{"fedavg": first}, {"fedavg": second}], ["WT"])
    assert results["fedavg"]["sites"]["C"]["repeats"] == 1 and results["fedavg"]["worst_site"]["site"] == "C"
    assert results["fedavg"]["sites"]["A"]["num_cases"] == 2
    lines = "\n".join(per_site_markdown(results, ["WT"]))
    assert "| C | 1 | 0.100 (1 repeat) |" in lines, "one fold scored C: no spread to show, not ± 0.000"
    assert "| A | 2 | 0.700 ± 0.141 |" in lines
    same = aggregate_repeats([{"fedavg": first}, {"fedavg": first}], ["WT"], cases_add_up=False)
    assert same["fedavg"]["sites"]["A"]["num_cases"] == 1, "seeds hold out the same cases"


def test_leaving_one_site_out_refuses_site_alone_models(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="local"):
        reproduce_repeated(tmp_path, "institution", tmp_path / "out", leave_one_out=True, configs=("fedavg", "local"))


@pytest.mark.parametrize("given, expected", [([], 86_400.0), (["--timeout", "7200"], 7200.0)])
def test_the_federated_runs_of_reproduce_get_its_timeout(tmp_path, monkeypatch, given, expected) -> None:  # noqa: ANN001
    """reproduce's federated runs are long (FixMatch at 16 x 40 steps took over an hour on 2 cores): they are not
    held to simulate's one hour but to reproduce's own limit, or --timeout, through every fold."""
    import fedlesion.simulations.reproduce as module
    from fedlesion.cli import main
    from fedlesion.simulations.synthetic import synthesize

    data = tmp_path / "data"
    synthesize(data, sites=2, cases_per_site=4, shape=(16, 16, 8), seed=0, flat=True)
    limits: list[float] = []

    def stop(config, num_sites, **kwargs):  # noqa: ANN001, ANN202
        limits.append(kwargs["timeout_s"])
        raise RuntimeError("stopped here: the limit is all this test needs")

    monkeypatch.setattr(module, "run_federation", stop)
    assert module.FEDERATED_TIMEOUT_S == 86_400.0
    assert main(["reproduce", "--data", str(data), "--split", "iid", "--sites", "2", "--folds", "2", "--configs",
                 "fedavg", "--out", str(tmp_path / "out"), *given]) != 0
    assert limits == [expected]
    for bad in ("0", "inf", "nan"):
        assert main(["reproduce", "--data", str(data), "--split", "iid", "--folds", "2", "--timeout", bad,
                     "--out", str(tmp_path / "out2")]) != 0
    assert limits == [expected], "refused before any run"


def test_an_interrupted_reproduce_continues_its_federated_run_from_the_last_round(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A call stopped mid-way (past --timeout, or killed) is continued by the same command: the federated run resumes
    from its last.pt; other settings, another split, or a run that completed no round are refused before anything
    trains."""
    import json

    import fedlesion.simulations.reproduce as module
    from fedlesion.common.config import with_defaults
    from fedlesion.simulations.synthetic import synthesize

    data = tmp_path / "data"
    synthesize(data, sites=2, cases_per_site=4, shape=(16, 16, 8), seed=0, flat=True)
    out = tmp_path / "out"
    calls: list[dict] = []
    trained: list[str] = []

    def federation(config, num_sites, **kwargs):  # noqa: ANN001, ANN202 - stops after "a round", as a timeout would
        calls.append(dict(config))
        folder = Path(config["output-dir"]) / config["run-name"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run_config.json").write_text(json.dumps(with_defaults(config)))
        (folder / "last.pt").write_bytes(b"round 3")
        raise RuntimeError("the federated run exceeded 5 s and was stopped")

    monkeypatch.setattr(module, "run_federation", federation)
    monkeypatch.setattr(module, "train_centralized", lambda data, path, **kw: trained.append(Path(path).name) or
                        (_ for _ in ()).throw(RuntimeError("pooled training is not what this test is about")))

    def call(configs=("fedavg",), **settings):  # noqa: ANN001, ANN003, ANN202
        return module.reproduce(data, "iid", data, out, run_config={"num-server-rounds": 4, **settings},
                                test_include=["*_003"], configs=list(configs), num_sites=2, report=lambda _: None)

    with pytest.raises(RuntimeError, match="exceeded"):
        call()
    assert "resume-from" not in calls[0] or not calls[0]["resume-from"]
    with pytest.raises(RuntimeError, match="exceeded"):
        call()  # the same command again: the run resumes from its last round
    assert calls[1]["resume-from"] == str(out / "runs" / "fedavg" / "last.pt")
    assert {k: v for k, v in calls[1].items() if k != "resume-from"} == {k: v for k, v in calls[0].items() if k != "resume-from"}
    with pytest.raises(ValueError, match=r"started with other settings \(num-server-rounds\)"):
        call(configs=("central", "fedavg"), **{"num-server-rounds": 5})
    assert trained == [], "refused before the pooled run trained"
    with pytest.raises(ValueError, match="another split or held-out cases"):
        module.reproduce(data, "iid", data, out, run_config={"num-server-rounds": 4}, test_include=["*_002"],
                         configs=["fedavg"], num_sites=2, report=lambda _: None)
    import fcntl

    with open(out / ".reproduce.lock", "w") as running:  # another call still at work in the folder
        fcntl.flock(running, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another reproduce call is running"):
            call()
    assert len(calls) == 2
    (out / "runs" / "fedavg" / "last.pt").unlink()
    with pytest.raises(ValueError, match="completed no round; remove that folder"):
        call()
    fedbn = tmp_path / "fedbn"
    for attempt in range(2):  # a FedBN run's sites keep their layers per run: it cannot resume, it is refused
        with pytest.raises(RuntimeError if attempt == 0 else ValueError, match="exceeded" if attempt == 0 else "FedBN run cannot be continued"):
            module.reproduce(data, "iid", data, fedbn, run_config={"num-server-rounds": 4}, test_include=["*_003"],
                             configs=["fedbn"], num_sites=2, report=lambda _: None)


def test_a_federated_run_finished_before_the_call_stopped_is_read_not_run_again(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The call stopped after its federated run had finished (while scoring, say): the same command reads that
    run (final.pt, metrics.jsonl) and trains nothing federated again."""
    import json

    import fedlesion.simulations.reproduce as module
    from fedlesion.common.config import with_defaults
    from fedlesion.simulations.synthetic import synthesize

    data = tmp_path / "data"
    synthesize(data, sites=2, cases_per_site=4, shape=(16, 16, 8), seed=0, flat=True)
    runs: list[str] = []
    scored: list[Path] = []

    def federation(config, num_sites, **kwargs):  # noqa: ANN001, ANN202 - a run that finishes
        runs.append(config.get("resume-from", ""))
        folder = Path(config["output-dir"]) / config["run-name"]
        folder.mkdir(parents=True)
        (folder / "run_config.json").write_text(json.dumps(with_defaults(config)))
        (folder / "metrics.jsonl").write_text(json.dumps({"round": 4, "server": {"dice-wt": 0.5}, "seconds": 9.0}) + "\n")
        (folder / "last.pt").write_bytes(b"4")
        (folder / "final.pt").write_bytes(b"4")
        return folder

    def score(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        scored.append(Path(path))
        raise RuntimeError("stopped while scoring")

    monkeypatch.setattr(module, "run_federation", federation)
    monkeypatch.setattr(module, "evaluate_checkpoint", score)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stopped while scoring"):
            module.reproduce(data, "iid", data, tmp_path / "out", run_config={"num-server-rounds": 4},
                             test_include=["*_003"], configs=["fedavg"], num_sites=2, report=lambda _: None)
    assert runs == [""], "trained once; the second call read the finished run"
    assert scored == [tmp_path / "out" / "runs" / "fedavg" / "final.pt"] * 2
