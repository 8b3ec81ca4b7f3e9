"""The FedLesion ServerApp: runs the configured strategy stack over the shared model.

Outputs land in the run folder, ``<output-dir>/<run-name>/`` (mode 0700; a resumed run continues in its
checkpoint's folder): ``metrics.jsonl``, ``metrics.csv``, ``audit.jsonl``, ``last.pt`` (every
round), ``best.pt`` (best validation Dice), ``final.pt`` (written only when the run completes)
and ``run_config.json`` (a resume keeps the one before as ``run_config.resume-<round>.json``).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedlesion.common.api import select_cases
from fedlesion.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedlesion.common.config import dataset_spec, model_from, train_config_from, with_defaults
from fedlesion.common.files import private_folder, replace_private
from fedlesion.common.data import DatasetSpec, conform_spec, discover_cases, load_site, resolve_spec
from fedlesion.common.engine import FINETUNE_FOLDS, evaluate, select_device
from fedlesion.common.metrics import flat_means
from fedlesion.common.model import batchnorm_keys, build_model, model_spatial_dims, resolved_model_args
from fedlesion.common.postprocess import PostProcessing

from .strategy import WEIGHT_KEY, build_strategy, format_table, site_error, site_name

app = ServerApp()

RUN_FILES = ("metrics.jsonl", "metrics.csv", "audit.jsonl", "last.pt", "best.pt", "final.pt",
             "run_config.json")  # what a run leaves in its folder


def run_folder(values: Mapping[str, Any]) -> Path:
    """The folder this run writes to; nothing is written or removed here.

    A resumed run continues in the folder of its ``resume-from`` checkpoint, where its history
    is, whatever ``output-dir`` and ``run-name`` say. A new run writes to ``<output-dir>/<run-name>``
    (the run name defaulting to a timestamp), which must not hold a run yet.

    Args:
        values: the run config with its defaults (:func:`fedlesion.common.config.with_defaults`).

    Raises:
        ValueError: when ``run-name`` is not a single folder name, or a new run's folder already holds a run.
    """
    if values["resume-from"]:
        return Path(values["resume-from"]).resolve().parent
    name = values["run-name"] or time.strftime("run-%Y%m%d-%H%M%S")
    if name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"run-name '{name}' must be a single folder name (no '/', '\\', '.' or '..'); "
                         "put the parent folders in output-dir.")
    folder = Path(values["output-dir"]).resolve() / name
    found = [file for file in RUN_FILES if (folder / file).exists()]
    if found:
        raise ValueError(f"run folder {folder} already holds a run ({', '.join(found)}); choose another run-name "
                         f"or output-dir, or continue that run with resume-from={folder / 'last.pt'}.")
    return folder


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def prepare_run_folder(folder: Path, values: Mapping[str, Any], resume: Resume | None) -> None:
    """Make ``folder`` ready for this run, once everything is validated.

    A resume removes the ``final.pt`` an earlier completion left (only a completed run has one),
    cuts ``metrics.jsonl`` back to the checkpoint's round (later lines, from a crash) and keeps
    the previous ``run_config.json`` as ``run_config.resume-<round>.json``. Files are replaced atomically.
    """
    private_folder(folder)  # 0700: run_config.json names local paths, metrics and checkpoints derive from patients
    config = folder / "run_config.json"
    if resume is not None:
        (folder / "final.pt").unlink(missing_ok=True)
        _write_atomically(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in resume.history))
        if config.exists():
            _write_atomically(folder / f"run_config.resume-{resume.round}.json", config.read_text())
    _write_atomically(config, json.dumps(values, indent=2, sort_keys=True))


def server_evaluator(values: Mapping[str, Any], model_name: str, model_args: dict[str, Any],
                     spec: DatasetSpec) -> Callable[[int, ArrayRecord], dict[str, float]] | None:
    """Score the global model on ``server-eval-data`` each round, when that folder is set, post-processed as the run says."""
    folder = values["server-eval-data"]
    if not folder:
        return None
    data_spec = conform_spec(resolve_spec(folder, values["server-eval-manifest"] or None), spec, f"server-eval-data {folder}")
    include = [p for p in values["server-eval-include"].split(",") if p]
    case_ids = select_cases(discover_cases(folder, data_spec), include=include)
    cases = load_site(folder, data_spec, case_ids=case_ids, crop_foreground=values["crop-foreground"]).cases
    device = select_device("auto")
    spatial_dims = model_spatial_dims(model_name)
    patch_size = train_config_from(values).patch_size
    postprocessing = PostProcessing.from_run_config(values)
    log(INFO, "server-side evaluation on %d case(s) of %s every %d round(s) and after the last", len(cases), folder,
        values["server-eval-every"])

    every, last = values["server-eval-every"], values["num-server-rounds"]
    if every < 1:
        raise ValueError(f"server-eval-every must be a whole number of rounds >= 1, got {every}.")

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        if server_round % every and server_round != last:
            return {}
        model = build_model(model_name, len(spec.channels), len(spec.regions), **model_args)
        model.load_state_dict(arrays.to_torch_state_dict())
        _, summary = evaluate(model.to(device), cases, spec, spatial_dims, device, patch_size=patch_size,
                              postprocessing=postprocessing)
        out = flat_means(summary, list(spec.regions))
        log(INFO, "round %d: server-side Dice %s", server_round,
            " ".join(f"{r} {block['dice_mean']:.3f}" for r, block in summary.items()))
        return out

    return evaluate_global


@dataclass
class Resume:
    """Where a resumed run picks up: the last completed round's weights, history and strategy state."""

    arrays: ArrayRecord
    round: int
    history: list[dict[str, Any]]
    state: dict[str, Any]  # RunRecorder.checkpoint_state() as the checkpoint saved it


def load_resume(path: str, model_name: str, model_args: dict[str, Any], spec: DatasetSpec | None = None) -> Resume:
    """Read ``resume-from`` and its run's metrics up to its round (later lines, from a crash, are
    dropped from what is returned; :func:`prepare_run_folder` writes that back). Reads only.

    Raises:
        ValueError: when the checkpoint is unreadable, was made with another model, other channels
            or regions than ``spec``, holds tensors of other shapes, or is not the run's latest
            round (``best.pt`` or an older copy while ``last.pt`` is further on).
    """
    ckpt = load_checkpoint(path)
    # Arguments added to a model since the checkpoint was written take their defaults.
    if ckpt.model != model_name or resolved_model_args(ckpt.model, **ckpt.model_args) != model_args:
        raise ValueError(f"resume-from {path}: trained {ckpt.model} {ckpt.model_args}, but this run configures "
                         f"{model_name} {model_args}; resume with the run's own config.")
    if spec is not None:
        if list(ckpt.spec.channels) != list(spec.channels) or list(ckpt.spec.regions) != list(spec.regions):
            raise ValueError(f"resume-from {path}: trained on channels {list(ckpt.spec.channels)} and regions "
                             f"{list(ckpt.spec.regions)}, but this run's dataset '{spec.name}' has channels "
                             f"{list(spec.channels)} and regions {list(spec.regions)}.")
        model = build_model(model_name, len(spec.channels), len(spec.regions), **model_args)
        try:
            model.load_state_dict(ckpt.state_dict)
        except RuntimeError as exc:
            raise ValueError(f"resume-from {path}: its tensors do not fit the model "
                             f"({str(exc).splitlines()[0]} ...).") from None
    folder = Path(path).resolve().parent
    last = folder / "last.pt"
    if last.exists() and last.resolve() != Path(path).resolve() and (latest := load_checkpoint(last).round) > ckpt.round:
        raise ValueError(f"resume-from {path} holds round {ckpt.round}, but the run went on to round {latest}; "
                         f"resume from {last} (a run continues from its latest round; start a new run "
                         "to branch off an earlier one).")
    metrics = folder / "metrics.jsonl"
    history = []
    if metrics.exists():  # a line cut short by the crash being resumed from is left out, not fatal
        for number, line in enumerate(metrics.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or type(row.get("round")) is not int:
                log(WARNING, "resume: %s line %d is not a round's record (cut short by the crash?); left out",
                    metrics, number)
            elif row["round"] <= ckpt.round:
                history.append(row)
    return Resume(ArrayRecord(ckpt.state_dict), ckpt.round, history, ckpt.extra)


def check_fedbn(values: dict[str, Any], model: torch.nn.Module, model_name: str) -> None:
    """Refuse ``fedbn`` for a model without BatchNorm layers: there would be nothing to keep local.

    Under FedBN the server still averages the sites' BatchNorm layers into the global model (the
    model it scores on held-out cases and a new site starts from), but no site loads them.
    """
    if not values["fedbn"]:
        return
    if not batchnorm_keys(model):
        raise ValueError(f"fedbn keeps each site's BatchNorm layers, but {model_name} with model-args "
                         f"'{values['model-args']}' has none: add norm=batch (unet2d) or set fedbn = false.")
    # A site's upload carries its own BatchNorm layers, far from the global average: clipping would spend the
    # bound on that gap, and a float16 delta of a small running variance from a large average can round below 0.
    if values["dp"] != "none":
        raise ValueError("fedbn is not supported with dp: the sites' own BatchNorm layers would take up the clipping bound.")
    if values["transport-dtype"] != "float32":
        raise ValueError("fedbn needs transport-dtype float32: float16 deltas of the sites' own BatchNorm statistics "
                         "from the global average can round to negative variances.")


def check_run(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], DatasetSpec, Resume | None, Path]:
    """Everything a run can be refused for before it starts, without writing anything: the run
    config's types and ranges, the dataset, the model, the strategy stack, ``fedbn``, the resume
    checkpoint and the run folder. The launcher calls it before it starts a SuperLink; the
    ServerApp calls it first, so a plain ``flwr run`` is checked too.

    Returns:
        ``(values with defaults, the dataset spec, the resume or None, the run folder)``.

    Raises:
        ValueError: naming the setting and the problem.
    """
    values = with_defaults(run_config)
    spec = dataset_spec(values["dataset"])
    model_name, model_args = model_from(values)
    check_fedbn(values, build_model(model_name, len(spec.channels), len(spec.regions), **model_args), model_name)
    build_strategy(values, out_dir=Path(values["output-dir"]), save_checkpoint=lambda *args: None)
    if values["min-train-nodes"] > values["min-available-nodes"] or values["min-evaluate-nodes"] > values["min-available-nodes"]:
        log(INFO, "min-train-nodes %d / min-evaluate-nodes %d exceed min-available-nodes %d: rounds use %d",
            values["min-train-nodes"], values["min-evaluate-nodes"], values["min-available-nodes"], values["min-available-nodes"])
    resume = load_resume(values["resume-from"], model_name, model_args, spec) if values["resume-from"] else None
    if resume is not None and resume.round > values["num-server-rounds"]:
        raise ValueError(f"resume-from {values['resume-from']} is at round {resume.round}, past num-server-rounds "
                         f"{values['num-server-rounds']}: set num-server-rounds higher to continue it.")
    return values, spec, resume, run_folder(values)


FINETUNE = "train.finetune"  # the message type of the ClientApp's fine-tuning handler
_METRIC_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")  # what a site's metric may be called in finetune.json


def finetune_sites(grid: Grid, strategy: Any, arrays: ArrayRecord, values: Mapping[str, Any], out_dir: Path,
                   timeout: float) -> list[dict[str, Any]]:
    """After the last round, ask every connected site to fine-tune the final model on its own cases and keep
    it there (the personal model never travels); record each site's scores of the global and the personal
    model on its validation cases in ``finetune.json`` and the log. Replies are screened as evaluations."""
    config = ConfigRecord({**strategy.round_config, "server-round": values["num-server-rounds"],
                           "finetune-epochs": values["finetune-epochs"],
                           "learning-rate": values["finetune-learning-rate"]})
    messages = [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type=FINETUNE)
                for node in sorted(grid.get_node_ids())]
    log(INFO, "fine-tuning: %d site(s), %d local epoch(s) each, proximal mu %g, %s", len(messages),
        values["finetune-epochs"], values["finetune-proximal-mu"],
        "kept only where it beats the global model on cases it did not train on" if values["finetune-select"] else "always kept")
    # N epochs and two evaluations: the time of about N/local-epochs + 1 rounds; selecting cross-validates the
    # fine-tuning (FINETUNE_FOLDS more runs and evaluations, then the kept one).
    runs = FINETUNE_FOLDS + 1 if values["finetune-select"] else 1
    replies = list(grid.send_and_receive(messages, timeout=timeout * runs * (values["finetune-epochs"] / values["local-epochs"] + 1)))
    screen = next(layer for layer in strategy.layers() if hasattr(layer, "metrics_problem"))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    sites: list[dict[str, Any]] = []
    seen: set[int] = set()
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id)
        if node is None or node in seen:  # a reply to nothing this asked, or a second one: not a site's answer
            log(WARNING, "fine-tuning: ignored a reply that answers no instruction sent (or answers one twice)")
            continue
        seen.add(node)
        if reply.has_error():
            sites.append({"node-id": node, "error": site_error(reply)})
        elif (reason := screen.metrics_problem(reply, True)) is not None:
            sites.append({"node-id": node, "rejected": reason})
        else:
            metrics = dict(next(iter(reply.content.metric_records.values())))
            sites.append({"node-id": node, "site": site_name(reply, node),
                          "metrics": {k: v for k, v in metrics.items() if _METRIC_NAME.match(k)}})
    sites.sort(key=lambda s: (s.get("site", ""), s["node-id"]))
    answered = {s["node-id"] for s in sites}
    sites += [{"node-id": m.metadata.dst_node_id, "error": "no reply within round-timeout"}
              for m in messages if m.metadata.dst_node_id not in answered]
    replace_private(out_dir / "finetune.json", json.dumps({"epochs": values["finetune-epochs"], "proximal-mu": values["finetune-proximal-mu"],
                                                            "select": values["finetune-select"],
                                                            "sites": sites},
                                                           indent=2).encode())
    for s in sites:
        if "metrics" in s:
            m = s["metrics"]
            regions = sorted(k.removeprefix("dice-") for k in m if k.startswith("dice-"))
            log(INFO, "fine-tuned %s (%d validation case(s)%s): %s", s["site"], int(m.get(WEIGHT_KEY, 0)),
                ", which also chose the model: read in its favour" if m.get("finetune-scores-chose") == 1.0 else "",
                "Dice global -> personal " + " ".join(
                    f"{r.upper()} {m.get(f'global-dice-{r}', float('nan')):.3f} -> {m[f'dice-{r}']:.3f}" for r in regions)
                if regions else "no validation case to score")
        else:
            log(WARNING, "fine-tuning at node %d: %s", s["node-id"], s.get("error") or s.get("rejected"))
    return sites


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build (or resume) the global model, run the strategy, and write metrics and checkpoints.

    Raises:
        ValueError: for a run config :func:`check_run` refuses (nothing is written).
        RuntimeError: when no round aggregated an update (every site failed or was rejected):
            ``final.pt`` is not written, so an untrained model never passes for a result.
    """
    # Everything is validated before the run folder changes: a refused resume leaves it as it was.
    values, spec, resume, out_dir = check_run(context.run_config)
    model_name, model_args = model_from(values)
    torch.manual_seed(values["seed"])
    random.seed(values["seed"])  # Flower samples sites with Python's random; a resume restores its state
    model = build_model(model_name, len(spec.channels), len(spec.regions), **model_args)
    num_rounds = values["num-server-rounds"]
    first_round = resume.round + 1 if resume else 1
    log(INFO, "FedLesion: %s %s on '%s' (%d channels, regions %s), rounds %d-%d; outputs in %s",
        values["strategy"], model_name, spec.name, len(spec.channels), "/".join(spec.regions), first_round,
        num_rounds, out_dir)

    def save(arrays: ArrayRecord, server_round: int, metrics: dict[str, Any], kind: str, state: dict[str, Any]) -> None:
        save_checkpoint(Checkpoint(
            model=model_name, model_args=model_args, spec=spec, state_dict=arrays.to_torch_state_dict(),
            round=server_round, metrics=metrics, run_config=values, extra=state,
        ), out_dir / f"{kind}.pt")

    strategy = build_strategy(values, out_dir=out_dir, save_checkpoint=save,
                              server_evaluate=server_evaluator(values, model_name, model_args, spec),
                              first_round=first_round, history=resume.history if resume else None)
    if resume:
        strategy.resume(resume.state)
    prepare_run_folder(out_dir, values, resume)
    timeout = float(values["round-timeout"])
    if resume:
        initial = resume.arrays
        log(INFO, "resumed from %s at round %d (restored: %s)", values["resume-from"], resume.round,
            sorted(resume.state) or "nothing")
    else:
        initial = ArrayRecord(model.state_dict())
        if values["evaluate-initial"]:
            strategy.evaluate_initial(grid, initial, timeout=timeout)
    final = initial
    if num_rounds >= first_round:
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds - first_round + 1, timeout=timeout)
        final = result.arrays if result.arrays is not None else initial
    if not any(record.get("train") and not record.get("failed") for record in strategy.history if record["round"] > 0):
        message = (f"no round aggregated an update: every site failed or was rejected in every round (reasons in "
                   f"{out_dir / 'audit.jsonl'} and the SuperNodes' logs); final.pt is not written.")
        strategy.record.audit({"round": num_rounds, "stopped": message})
        raise RuntimeError(message)
    save(final, num_rounds, strategy.history[-1] if strategy.history else {}, "final", strategy.checkpoint_state())
    if values["finetune-epochs"] > 0:  # the run's result (final.pt) is written: a failure here only costs the extra
        try:
            finetune_sites(grid, strategy, final, values, out_dir, timeout)
        except Exception as exc:  # noqa: BLE001
            log(WARNING, "fine-tuning failed (%s: %s); the federated run itself is complete", type(exc).__name__, exc)
    log(INFO, "Per-round metrics (%s):\n%s", out_dir / "metrics.jsonl", format_table(strategy.history))
