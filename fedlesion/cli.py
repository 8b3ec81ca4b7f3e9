"""The ``fedlesion`` command: one prefix, one verb per stage (nnU-Net style).

Each verb is a thin wrapper over a Python function that tests and scripts call directly.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any

from fedlesion.common.config import CHOICES, declared_run_config, parse_shape


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


CACHE_DIR_HELP = ("a case-cache folder: each case is preprocessed once into it and read back memory-mapped "
                  "(patient-derived arrays: opt-in for real data; default $FEDLESION_CACHE_DIR, else synthetic sites "
                  "only, in <output-dir>/cache)")


def presets() -> list[str]:
    """Names of the run-config presets that ship with FedLesion (``simulations/presets/<name>.toml``)."""
    return sorted(p.name.removesuffix(".toml") for p in files("fedlesion.simulations").joinpath("presets").iterdir()
                  if p.name.endswith(".toml"))


def read_preset(name_or_path: str) -> dict[str, Any]:
    """A TOML file of run-config values, or a shipped preset by name (``--run-config smoke``).

    Raises:
        ValueError: naming the file, when it is neither, or not TOML.
    """
    path = Path(name_or_path)
    try:
        if path.is_file():
            return tomllib.loads(path.read_text(encoding="utf-8"))
        if name_or_path.removesuffix(".toml") in presets():
            return tomllib.loads(files("fedlesion.simulations").joinpath("presets", f"{name_or_path.removesuffix('.toml')}.toml")
                                 .read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"run config {name_or_path}: cannot be read as TOML ({exc}).") from None
    raise ValueError(f"run config '{name_or_path}': neither a TOML file nor a shipped preset {presets()}.")


def _run_config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Run-config values from ``--run-config FILE`` then ``--set KEY=VALUE`` (later wins)."""
    overrides: dict[str, Any] = {}
    if args.run_config:
        overrides.update(read_preset(args.run_config))
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)
    return overrides


def cmd_synth(args: argparse.Namespace) -> int:
    from fedlesion.simulations.synthetic import synthesize

    shape = parse_shape(args.shape)
    sites = synthesize(args.out, args.sites, args.cases_per_site, shape, args.seed, flat=args.flat)
    for site, cases in sites.items():
        print(f"site-{site}: {len(cases)} cases -> {Path(args.out) if args.flat else Path(args.out) / f'site-{site}'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedlesion.server.strategy import format_table

    from fedlesion.simulations.launch import become_subreaper, read_history, run_federation, signals_deferred, stop_descendants

    overrides = _run_config_overrides(args)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    overrides["output-dir"] = args.out
    overrides.setdefault("run-name", time.strftime("run-%Y%m%d-%H%M%S"))
    resume = str(overrides.get("resume-from", ""))
    folder = Path(resume).resolve().parent if resume else Path(args.out).resolve() / str(overrides["run-name"])
    started: list[bool] = []

    def adopt_orphans() -> None:  # once every check has passed: this process adopts what the run leaves behind
        become_subreaper()
        started.append(True)

    try:
        run_dir = run_federation(overrides, num_sites=args.sites, timeout_s=args.timeout, on_start=adopt_orphans,
                                 cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    except KeyboardInterrupt:
        last = folder / "last.pt"
        print(f"\nfedlesion simulate: interrupted; the simulation and its processes are stopped. "
              + (f"The last completed round is in {last}; continue with the same options plus "
                 f"--set resume-from='{last}'." if last.exists() else "No round had completed."), file=sys.stderr)
        return 128 + _SIGNAL[0]
    finally:
        if started:  # a run was started by this command: its process holds nothing else
            with signals_deferred():
                stop_descendants()  # anything the run left behind and this process adopted
    print("\nPer-round metrics of the global model (validation cases of every site, weighted by cases):\n")
    print(format_table(read_history(run_dir)))
    print(f"\nRun folder: {run_dir}\n  metrics.jsonl, metrics.csv, final.pt (global model), best.pt, last.pt, run_config.json")
    return 0


def _train_config(args: argparse.Namespace) -> Any:
    from fedlesion.common.checkpoint import load_checkpoint
    from fedlesion.common.config import declared_run_config, train_config_from

    declared = declared_run_config()
    # From a checkpoint, fine-tuning's defaults: the sites' fine-tuning step size and the checkpoint's own
    # patch (which is also its sliding window; another one is refused); otherwise the run config's.
    learning_rate = (args.learning_rate if args.learning_rate is not None
                     else declared["finetune-learning-rate" if args.init_from else "learning-rate"])
    if not args.proximal_mu >= 0:
        raise ValueError(f"--proximal-mu must be a number >= 0, got {args.proximal_mu}")
    patch_size = args.patch_size or (",".join(map(str, load_checkpoint(args.init_from).patch_size)) if args.init_from
                                     else declared["patch-size"])
    return train_config_from({"batch-size": args.batch_size, "learning-rate": learning_rate,
                              "samples-per-case": args.samples_per_case, "pos-ratio": args.pos_ratio,
                              "patch-size": patch_size, "local-steps": args.steps_per_epoch,
                              "fixmatch-threshold": args.fixmatch_threshold, "fixmatch-weight": args.fixmatch_weight,
                              "fixmatch-negative-share": args.fixmatch_negative_share,
                              "fixmatch-teacher": args.fixmatch_teacher, "fixmatch-loss": args.fixmatch_loss,
                              "fixmatch-ema-decay": args.fixmatch_ema_decay},
                             epochs=args.epochs, seed=args.seed, proximal_mu=args.proximal_mu)


def cmd_train(args: argparse.Namespace) -> int:
    from fedlesion.common.api import train_centralized
    from fedlesion.common.config import parse_model_args

    train_centralized(
        args.data, args.out, model=args.model, model_args=parse_model_args(args.model_args), manifest=args.manifest,
        config=_train_config(args), val_fraction=args.val_fraction, include=args.include or (),
        exclude=args.exclude or (), crop_foreground=args.crop_foreground, device=args.device, force=args.force,
        semi_supervised=args.semi_supervised, label_fraction=args.label_fraction, init_from=args.init_from,
    )
    print(f"checkpoint: {args.out}")
    return 0


def _postprocess_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The post-processing flags given, as run-config values that win over the checkpoint's."""
    given = {"postprocess": args.postprocess, "postprocess-min-mm3": args.postprocess_min_mm3,
             "postprocess-components": args.postprocess_components}
    return {key: value for key, value in given.items() if value is not None}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedlesion.common.api import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data, args.out, manifest=args.manifest,
                                 include=args.include or (), exclude=args.exclude or (), device=args.device,
                                 postprocess=_postprocess_overrides(args), force=args.force, sites=args.by_site)
    for region, block in result["summary"].items():
        print(f"{region}: Dice {block['dice_mean']:.3f} ± {block['dice_std']:.3f} | IoU {block['iou_mean']:.3f} ± "
              f"{block['iou_std']:.3f} | HD95 {block['hd95_mean']:.1f} mm")
    for site, block in (result.get("sites") or {}).items():
        dice = " ".join(f"{r} {b['dice_mean']:.3f}" for r, b in block["summary"].items()) or "no case scored"
        print(f"  site {site} ({block['num_cases']} case(s)): Dice {dice}")
    if args.by_site and not result.get("worst_site"):
        raise ValueError(f"--by-site {args.by_site}: none of its sites' cases were scored in {args.data}; "
                         "is it a split of this folder?")
    if result.get("worst_site"):
        worst = result["worst_site"]
        print(f"  worst site: {worst['site']} ({worst['region']} Dice {worst['dice_mean']:.3f})")
    if result["seconds_per_case"] is not None:
        print(f"{len(result['cases'])} case(s), {result['seconds_per_case']:.2f} s per case end to end; "
              f"{len(result['skipped'])} skipped; post-processing {result['postprocessing']} -> {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fedlesion.common.api import predict_case

    result = predict_case(args.checkpoint, args.case, args.out, manifest=args.manifest, overlay=args.overlay,
                          device=args.device, postprocess=_postprocess_overrides(args), force=args.force)
    print(f"{result['case']}: wrote {result['out']} in {result['seconds']:.2f} s; label voxels {result['labels']}"
          + (f"; overlay {result['overlay']}" if "overlay" in result else ""))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from fedlesion.common.api import select_cases
    from fedlesion.common.data import discover_cases, resolve_spec

    from fedlesion.common.splits import make_split, tumour_volumes

    spec = resolve_spec(args.data, args.manifest)
    ids = select_cases(discover_cases(args.data, spec), args.include or (), args.exclude or ())
    volumes = tumour_volumes(args.data, spec, ids) if args.kind == "dirichlet-volume" else None
    split = make_split(args.kind, ids, num_sites=args.sites, alpha=args.alpha, seed=args.seed, volumes=volumes)
    split.save(args.out)
    for note in split.notes:
        print(f"note: {note}")
    for site, size in split.sizes().items():
        print(f"{site:>12}: {size} case(s)")
    print(f"{len(split.sites)} site(s), {sum(split.sizes().values())} case(s) -> {args.out}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from fedlesion.common.data import resolve_spec
    from fedlesion.simulations.reproduce import DEFAULT_CONFIGS, reproduce, reproduce_repeated, semi_supervised_study

    overrides = _run_config_overrides(args)
    configs = args.configs.split(",") if args.configs else list(DEFAULT_CONFIGS)
    repeated = bool(args.folds or args.seeds or args.leave_one_out)
    if repeated and (args.folds or args.leave_one_out) and (args.test_data or args.test_include):
        raise ValueError("--folds and --leave-one-out hold out cases of --data itself; leave out --test-data and "
                         "--test-include.")
    if not repeated and not args.test_data:
        raise ValueError("reproduce needs --test-data (with --test-include when it is --data), or --folds.")
    if args.timeout is not None and not 0 < args.timeout < 1e9:
        raise ValueError(f"--timeout must be a number of seconds > 0 (and < 1e9), got {args.timeout}.")
    timeout = {"timeout_s": args.timeout} if args.timeout is not None else {}  # else reproduce's own default

    def run(run_config: dict[str, Any], out: Path) -> dict[str, Any]:
        if repeated:
            return reproduce_repeated(args.data, args.split, out, folds=args.folds,
                                      seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else (),
                                      test_data=args.test_data, test_include=args.test_include or (), run_config=run_config,
                                      manifest=args.manifest, configs=configs, num_sites=args.sites,
                                      cache_dir=args.cache_dir, leave_one_out=args.leave_one_out, **timeout)
        return reproduce(args.data, args.split, args.test_data, out, run_config=run_config, manifest=args.manifest,
                         test_include=args.test_include or (), configs=configs, num_sites=args.sites,
                         cache_dir=args.cache_dir, **timeout)

    if args.semi_supervised_study:
        semi_supervised_study(run, args.out, overrides, list(resolve_spec(args.data, args.manifest).regions))
    else:
        run(overrides, Path(args.out))
    print((Path(args.out) / "results.md").read_text())
    where = "each repeat in its sub-folder" if repeated else "the runs in runs/"
    extra = "semi_supervised.json, " if args.semi_supervised_study else ""
    print(f"results.json, results.md, {extra}curves.png, reproduce.json -> {args.out} ({where}"
          + (", each variant in its own sub-folder)" if args.semi_supervised_study else ")"))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedlesion.server.certs import make_certificates

    passphrase = None
    if args.ca_passphrase_file:
        passphrase = Path(args.ca_passphrase_file).read_bytes().rstrip(b"\r\n")
    files = make_certificates(args.out, [h for h in args.hosts.split(",") if h], ca_passphrase=passphrase)
    for name, path in files.items():
        print(f"{name:>24}: {path}")
    print("Keep ca.key offline. Give every hospital ca.crt; each hospital makes its own key pair "
          "(`fedlesion keygen`) and sends you only its .pub, which you register with `flwr supernode register`.")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from fedlesion.client.keys import fingerprint, make_hospital_key

    private, public = make_hospital_key(args.out, args.name)
    print(f"private key (stays here, mode 0600): {private}")
    print(f"public key (send to the coordinator): {public}")
    print(f"fingerprint: {fingerprint(public.read_text())}  (read it to the coordinator over a second channel; "
          "they compare it with `ssh-keygen -lf` before registering)")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from fedlesion.common.data import cache_entries, cache_size, default_cache_dir, purge_cache

    folder = Path(args.dir) if args.dir else default_cache_dir()
    if args.purge:
        removed, freed = purge_cache(folder)
        print(f"{folder}: removed {removed} cached case(s), {freed / 2**20:.1f} MB")
    else:
        print(f"{folder}: {len(cache_entries(folder))} cached case(s), {cache_size(folder) / 2**20:.1f} MB "
              "(preprocessed scans: patient-derived; `fedlesion cache --purge` empties it)")
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    from fedlesion.server.superlink import serve

    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    serve(args.fleet_address, args.control_address, flower_args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedlesion.server.strategy import format_table

    from fedlesion.simulations.deploy import demo
    from fedlesion.simulations.launch import read_history

    run_dir = demo(Path(args.out), sites=args.sites, rounds=args.rounds)
    print(format_table(read_history(run_dir)))
    print(f"Run folder: {run_dir}; logs and certificates: {Path(args.out) / 'federation'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fedlesion.common.config import parse_model_args

    from fedlesion.simulations.bench import run_bench

    models = args.models.split(",")
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint or [])
    model_args = {name: parse_model_args(args.model_args) for name in models} if args.model_args else None
    run_bench(args.data, args.out, models, manifest=args.manifest, cases=args.cases, repeats=args.repeats,
              checkpoints=checkpoints, model_args=model_args, sections=args.sections.split(","),
              scale_sites=[int(n) for n in args.scale_sites.split(",") if n],
              site_sizes=[int(n) for n in args.site_sizes.split(",") if n], site_shape=parse_shape(args.site_shape),
              devices=args.devices.split(",") if args.devices != "auto" else None)
    print((Path(args.out) / "bench.md").read_text())
    print(f"bench.json, bench.md -> {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fedlesion.common.model import MODELS, build_model

    for name, entry in MODELS.items():
        params = sum(p.numel() for p in build_model(name, 4, 3).parameters())
        print(f"{name:12s} {entry.spatial_dims}D  {params / 1e6:6.2f} M parameters  defaults {entry.defaults}")
    return 0


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data folder (BraTS 2018-2023, MSD Task01 or a manifest layout)")
    parser.add_argument("--manifest", help="manifest JSON or built-in layout name (default: found in --data)")
    parser.add_argument("--include", action="append", metavar="GLOB", help="use only case IDs matching (repeatable)")
    parser.add_argument("--exclude", action="append", metavar="GLOB", help="skip case IDs matching (repeatable)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")


def _postprocess_arguments(parser: argparse.ArgumentParser) -> None:
    # No defaults here: what is not given comes from the checkpoint (the declared defaults for older ones).
    parser.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=None,
                        help="remove the lesion's small and surplus components (default: as the checkpoint was trained)")
    parser.add_argument("--postprocess-min-mm3", type=float, metavar="MM3",
                        help="remove lesion components smaller than this volume (default: the checkpoint's)")
    parser.add_argument("--postprocess-components", type=int, metavar="N",
                        help="keep at most this many largest lesion components, 0 no limit (default: the checkpoint's)")


def build_parser() -> argparse.ArgumentParser:
    # Defaults that are run-config settings come from [tool.flwr.app.config], so the commands and
    # a federated run train alike unless told otherwise.
    declared = declared_run_config()
    parser = argparse.ArgumentParser(
        prog="fedlesion",
        description="Federated lesion segmentation: simulate a hospital federation, train, evaluate and predict.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="write synthetic BraTS-like sites (BraTS 2021 layout)",
                           description="Write synthetic BraTS-like sites under OUT/site-<i>/, one folder per case in "
                                       "the BraTS 2021 layout. Sites differ in size and scanner.")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    synth.add_argument("--cases-per-site", type=int, default=declared["synth-cases-per-site"],
                       help="mean cases per site; sizes range from 0.5x to 1.5x of it (default %(default)s)")
    synth.add_argument("--shape", default=declared["synth-shape"], help="volume size X,Y,Z (default %(default)s)")
    synth.add_argument("--seed", type=int, default=declared["seed"], help="random seed (default %(default)s)")
    synth.add_argument("--flat", action="store_true", help="all cases in OUT itself (sites readable from the IDs)")
    synth.set_defaults(func=cmd_synth)

    simulate = sub.add_parser("simulate", help="run the federation in simulation through `flwr run`",
                              description="Run the Flower app on Flower's simulation engine, one virtual SuperNode per "
                                          "site, on a private local SuperLink that is stopped afterwards. Without "
                                          "data-root the sites are synthetic and generated on first use.")
    simulate.add_argument("--sites", type=int, default=3, help="number of sites / virtual SuperNodes (default 3)")
    simulate.add_argument("--rounds", type=int, default=None, help="federated rounds (default: num-server-rounds)")
    simulate.add_argument("--run-config", help="a TOML file of run-config values, or a shipped preset by name: "
                          "smoke, brats2021-fets1, ... (simulations/presets/)")
    simulate.add_argument("--set", action="append", metavar="KEY=VALUE",
                          help="override one run-config value, e.g. --set local-epochs=2 (repeatable)")
    simulate.add_argument("--out", default=declared["output-dir"],
                          help="output folder; the run folder is made inside (default %(default)s)")
    simulate.add_argument("--timeout", type=float, default=3600.0, help="stop the run after this many seconds")
    simulate.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    simulate.set_defaults(func=cmd_simulate)

    train = sub.add_parser("train", help="centralized (pooled) training, the baseline federation is compared with",
                           description="Train one model on all selected cases of one data folder. Writes a "
                                       "self-describing checkpoint after every epoch and prints progress.")
    _data_arguments(train)
    train.add_argument("--out", required=True, help="checkpoint file to write, e.g. model.pt")
    train.add_argument("--model", help=f"model name, see `fedlesion models` (default {declared['model']}; with "
                                       "--init-from, the checkpoint's)")
    train.add_argument("--model-args", default="", help="model argument overrides, e.g. 'base_channels=16 depth=4'")
    train.add_argument("--epochs", type=int, default=20, help="epochs (default 20)")
    train.add_argument("--steps-per-epoch", type=int, default=0,
                       help="optimiser steps per epoch; 0 (the default): one pass over samples-per-case slices of every case")
    train.add_argument("--batch-size", type=int, default=declared["batch-size"],
                       help="slices or patches per step (default %(default)s)")
    train.add_argument("--learning-rate", type=float,
                       help=f"Adam learning rate (default {declared['learning-rate']}; with --init-from "
                            f"{declared['finetune-learning-rate']}, the sites' finetune-learning-rate)")
    train.add_argument("--samples-per-case", type=int, default=declared["samples-per-case"],
                       help="slices/patches per case per epoch (default %(default)s)")
    train.add_argument("--pos-ratio", type=float, default=declared["pos-ratio"],
                       help="share of samples containing lesion (default %(default)s)")
    train.add_argument("--patch-size",
                       help=f"3D patch size X,Y,Z (3D models; default {declared['patch-size']}; with --init-from, "
                            "the checkpoint's)")
    train.add_argument("--val-fraction", type=float, default=declared["val-fraction"],
                       help="share of cases held out for per-epoch validation (default %(default)s)")
    train.add_argument("--crop-foreground", action=argparse.BooleanOptionalAction,
                       help=f"crop volumes to their nonzero box (default {declared['crop-foreground']}; with "
                            "--init-from, the checkpoint's, and another value is refused)")
    train.add_argument("--seed", type=int, default=declared["seed"], help="random seed (default %(default)s)")
    train.add_argument("--semi-supervised", action=argparse.BooleanOptionalAction, default=declared["semi-supervised"],
                       help="FixMatch: train on unlabelled cases too (scans without a label file, cases the manifest "
                            "marks unlabelled, labels hidden by --label-fraction); otherwise they are skipped "
                            "(default %(default)s)")
    train.add_argument("--label-fraction", type=float, default=declared["label-fraction"],
                       help="experiments: keep the labels of this share of the training cases (at least one), chosen "
                            "by --seed; the others count as unlabelled (default %(default)s)")
    train.add_argument("--fixmatch-threshold", type=float, default=declared["fixmatch-threshold"],
                       help="tau: a voxel counts as lesion where the probability is above tau, as background below "
                            "1 - tau; 1.0 counts background only, through --fixmatch-negative-share (default %(default)s)")
    train.add_argument("--fixmatch-negative-share", type=float, default=declared["fixmatch-negative-share"],
                       help="also count this share of each region's predicted-negative brain voxels, the least likely "
                            "ones, as confident background (0: tau alone, which needs tau < 1; default %(default)s)")
    train.add_argument("--fixmatch-teacher", choices=CHOICES["fixmatch-teacher"], default=declared["fixmatch-teacher"],
                       help="who labels the weak view: student (the model being trained), ema (its exponential "
                            "moving average, the mean teacher) or offline (the model as each epoch starts labels every "
                            "unlabelled case's whole volume, post-processed as predictions are; default %(default)s)")
    train.add_argument("--fixmatch-ema-decay", type=float, default=declared["fixmatch-ema-decay"],
                       help="with --fixmatch-teacher ema: the share of itself the teacher keeps at each step "
                            "(default %(default)s)")
    train.add_argument("--fixmatch-loss", choices=CHOICES["fixmatch-loss"], default=declared["fixmatch-loss"],
                       help="hard: Dice + focal on thresholded pseudo-labels (FixMatch); soft: mean squared error to "
                            "the teacher's probabilities on every brain voxel (consistency; default %(default)s)")
    train.add_argument("--fixmatch-weight", type=float, default=declared["fixmatch-weight"],
                       help="lambda_u, the unlabelled loss's weight (constant over the epochs; default %(default)s)")
    train.add_argument("--init-from", metavar="CHECKPOINT",
                       help="start from this checkpoint's weights (a federation's final.pt, another train's) instead of "
                            "random ones: a site's own fine-tuned copy of a model it received. Its model and arguments, "
                            "channels, regions, cropping, 3D patch and post-processing come from it")
    train.add_argument("--proximal-mu", type=float, default=0.0,
                       help="with --init-from: add mu/2 * ||w - w_start||^2 to the loss, so the personal model stays "
                            "near the one it started from (FedProx's term, Ditto's personal objective; default 0: off)")
    train.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="score a checkpoint per region (Dice, IoU, HD95) and write JSON",
                              description="Predict every labelled case of a data folder with a checkpoint and write "
                                          "per-case and summary metrics (mean ± std) per region as JSON.")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint from `fedlesion train` or a federated run")
    _data_arguments(evaluate)
    evaluate.add_argument("--out", default="metrics.json", help="JSON file to write (default metrics.json)")
    evaluate.add_argument("--force", action="store_true", help="replace an existing --out (never the checkpoint)")
    evaluate.add_argument("--by-site", metavar="SPLIT",
                          help="also score each site of a split: a split JSON from `fedlesion split`, or institution, "
                               "fets1, fets2 (adds 'sites' and 'worst_site' to the JSON)")
    _postprocess_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="segment one case and write NIfTI (optionally a PNG overlay)",
                             description="Segment one case folder. The output has the input's shape, affine and "
                                         "header, and the dataset's label values (0/1/2/4 for BraTS), so viewers "
                                         "such as 3D Slicer and ITK-SNAP overlay it directly.")
    predict.add_argument("--checkpoint", required=True, help="checkpoint file")
    predict.add_argument("--case", required=True, help="the case folder")
    predict.add_argument("--out", required=True, help="output NIfTI, e.g. seg.nii.gz")
    predict.add_argument("--manifest", help="manifest when the case's file names differ from the training layout")
    predict.add_argument("--overlay", help="also write scan | prediction | ground truth as this PNG")
    predict.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    predict.add_argument("--force", action="store_true",
                         help="replace an existing --out / --overlay (never one of the case's scans or the checkpoint)")
    _postprocess_arguments(predict)
    predict.set_defaults(func=cmd_predict)

    split = sub.add_parser("split", help="split a dataset's cases into federated sites and write the split JSON",
                           description="Split the cases of one data folder into sites: by institution (BraTS 2018-2020 "
                                       "IDs), by the FeTS 2022 partitions of BraTS 2021 (fets1: 23 sites, fets2: 33), "
                                       "IID, or Dirichlet-skewed by case count or tumour volume.")
    _data_arguments(split)
    split.add_argument("--kind", required=True, choices=["institution", "fets1", "fets2", "fets-small", "iid",
                                                         "dirichlet-count", "dirichlet-volume"])
    split.add_argument("--sites", type=int, default=3, help="number of sites for iid and Dirichlet splits (default 3)")
    split.add_argument("--alpha", type=float, default=declared["split-alpha"],
                       help="Dirichlet concentration; smaller is more skewed (default %(default)s)")
    split.add_argument("--seed", type=int, default=declared["seed"], help="random seed (default %(default)s)")
    split.add_argument("--out", required=True, help="split JSON to write")
    split.set_defaults(func=cmd_split)

    repro = sub.add_parser("reproduce", help="pooled vs federated strategies vs local-only on one split, "
                                             "once or over folds / seeds",
                           description="Train the same model for the same total local epochs centrally, with each "
                                       "chosen strategy (through flwr run), and at each site alone; score all on the "
                                       "same held-out cases; write results.json/.md, curves.png, overlay.png. With "
                                       "--folds or --seeds, once per fold or seed in sub-folders, and the top-level "
                                       "files hold mean ± std over them. Held-out cases of the split's own sites are "
                                       "also scored per site, and each site's own models on its own cases: "
                                       "fedbn-personal (the global model with the site's BatchNorm layers) and, with "
                                       "--set finetune-epochs=N, <strategy>-finetuned.")
    repro.add_argument("--data", required=True, help="training data folder")
    repro.add_argument("--manifest", help="manifest of --data and --test-data (default: found in the folder)")
    repro.add_argument("--split", required=True, help="split kind (institution, fets1, fets2, iid, dirichlet-count, "
                                                      "dirichlet-volume) or a split JSON from `fedlesion split`")
    repro.add_argument("--test-data", help="folder with the held-out cases (may be --data with --test-include); "
                                           "not with --folds")
    repro.add_argument("--test-include", action="append", metavar="GLOB", help="held-out case IDs (repeatable); "
                       "when --test-data is --data they are removed from training")
    repro.add_argument("--sites", type=int, default=3, help="sites for iid / Dirichlet splits (default 3)")
    repro.add_argument("--configs", help="comma-separated: central, local (every site alone), fedavg, fedprox, fedadam, "
                                         "fedyogi, fedavgm, fedmedian, fedtrimmedavg, krum, fedbn (FedAvg, BatchNorm "
                                         "kept at each site) (default central,fedavg,fedprox,fedadam,local)")
    repro.add_argument("--folds", type=int, default=0,
                       help="K-fold cross-validation: each fold holds out 1/K of every site's cases (default: off)")
    repro.add_argument("--seeds", help="comma-separated seeds: one run per seed on the same held-out cases")
    repro.add_argument("--run-config", help="a TOML file, or a shipped preset by name (simulations/presets/)")
    repro.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one run-config value (repeatable)")
    repro.add_argument("--out", required=True, help="output folder")
    repro.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    repro.add_argument("--timeout", type=float, default=None,
                       help="stop a federated run that takes longer than this many seconds (default: one day, "
                            "FEDERATED_TIMEOUT_S in simulations/reproduce.py)")
    repro.add_argument("--leave-one-out", action="store_true",
                       help="each site of the split in turn is held out (all its cases) and every configuration trains "
                            "on the others: generalisation to a hospital that did not take part (out-<site>/)")
    repro.add_argument("--semi-supervised-study", action="store_true",
                       help="run every configuration three times: on the labels label-fraction keeps (-labelled), with "
                            "FixMatch on the other cases (-fixmatch) and on every label (-full), in labelled/, "
                            "fixmatch/, full/; the top-level table adds the share of the Dice gap FixMatch recovers "
                            "(needs label-fraction < 1, e.g. --run-config reproduce-fixmatch)")
    repro.set_defaults(func=cmd_reproduce)

    certs = sub.add_parser("certs", help="coordinator: create the federation's CA and the SuperLink's TLS pair",
                           description="Write ca.crt, ca.key, superlink.crt and superlink.key (SANs: --hosts plus "
                                       "localhost and 127.0.0.1). Refuses a folder that already holds any of them: "
                                       "a CA is never overwritten. Hospitals make their own keys (fedlesion keygen).")
    certs.add_argument("--out", required=True, help="folder to write (never commit it)")
    certs.add_argument("--hosts", default="localhost,127.0.0.1",
                       help="comma-separated DNS names / IPs hospitals reach the SuperLink at (default localhost,127.0.0.1)")
    certs.add_argument("--ca-passphrase-file", help="encrypt ca.key with the passphrase in this file (recommended)")
    certs.set_defaults(func=cmd_certs)

    keygen = sub.add_parser("keygen", help="hospital: create this SuperNode's authentication key pair",
                            description="Write <out>/<name> (private, mode 0600, stays at the hospital) and "
                                        "<out>/<name>.pub (send it to the coordinator), ECDSA P-384 in OpenSSH format, "
                                        "as `ssh-keygen -t ecdsa -b 384` makes; prints the fingerprint to compare.")
    keygen.add_argument("--out", required=True, help="folder for the key pair (never commit it)")
    keygen.add_argument("--name", required=True, help="this hospital's name, e.g. hospital-a")
    keygen.set_defaults(func=cmd_keygen)

    cache = sub.add_parser("cache", help="show or empty the preprocessed-case cache",
                           description="The on-disk case cache holds preprocessed scans (patient-derived) so that "
                                       "rounds decode no NIfTI twice: a folder per case, .npy arrays and JSON. Without "
                                       "--dir: $FEDLESION_CACHE_DIR, else ~/.cache/fedlesion/cases (where SuperNodes "
                                       "cached before the cache became opt-in; now a SuperNode caches only in the "
                                       "cache-dir its node config names). It is bounded by "
                                       "FEDLESION_CACHE_DISK_GIB (default 100), least recently used cases first.")
    cache.add_argument("--dir", help="the cache folder (default: as above)")
    cache.add_argument("--purge", action="store_true", help="remove every cached case (only cache entries are touched)")
    cache.set_defaults(func=cmd_cache)

    superlink = sub.add_parser(
        "superlink", help="coordinator: Flower's SuperLink with the Control API off the hospitals' address",
        description="Run Flower's SuperLink on two listeners: --fleet-address (open it to the hospitals) answers only "
                    "the Fleet API SuperNodes use; --control-address (loopback by default) answers flwr run, flwr "
                    "supernode register/list, flwr stop and the ServerApp. Other flower-superlink options go after "
                    "'--', e.g. -- --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/superlink.crt "
                    "--ssl-keyfile certs/superlink.key --enable-supernode-auth --database state.db. TLS is required.")
    superlink.add_argument("--fleet-address", default="0.0.0.0:9092", help="IP:port for SuperNodes (default 0.0.0.0:9092)")
    superlink.add_argument("--control-address", default="127.0.0.1:9093",
                           help="IP:port for flwr and the ServerApp (default 127.0.0.1:9093, this machine only)")
    superlink.add_argument("flower_args", nargs=argparse.REMAINDER, help="flower-superlink options, after '--'")
    superlink.set_defaults(func=cmd_superlink)

    demo = sub.add_parser("demo-federation", help="a real TLS + authenticated federation on localhost, then stop it",
                          description="Start one SuperLink (TLS, SuperNode authentication), one SuperNode per "
                                      "synthetic hospital, run a few rounds with flwr run, and stop everything.")
    demo.add_argument("--out", default="outputs/demo-federation", help="output folder")
    demo.add_argument("--sites", type=int, default=3, help="hospitals (default 3)")
    demo.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="speed and memory, ours beside the MONAI pipelines users would otherwise pick",
                           description="Sections (--sections): inference = load -> preprocess -> predict -> labels -> NIfTI "
                                       "per case, ours and a plain MONAI pipeline with the same network and weights; training "
                                       "= samples/s, ours and MONAI's CacheDataset + DataLoader recipe; federation = a "
                                       "simulation of the main job: orchestration overhead and upload bytes, float32 and "
                                       "float16 transport; scale = simulations of --scale-sites sites (FeTS partitioning_2 "
                                       "proportions): peak memory and seconds per round, and one site of --site-sizes cases "
                                       "served by a SuperNode's ClientApp processes (one per message): peak memory, seconds "
                                       "per message, cases read. Warm-up, median of --repeats, CPU "
                                       "and CUDA when present. Writes bench.json and bench.md.")
    bench.add_argument("--data", help="data folder (the inference and training sections)")
    bench.add_argument("--manifest", help="its manifest (default: found in the folder)")
    bench.add_argument("--models", default="unet2d,unet2d-lite", help="comma-separated models (default unet2d,unet2d-lite)")
    bench.add_argument("--checkpoint", action="append", metavar="MODEL=PATH", help="trained weights for a model (repeatable)")
    bench.add_argument("--model-args", default="", help="model argument overrides for untrained models")
    bench.add_argument("--cases", type=int, default=2, help="cases to time (default 2)")
    bench.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up (default 3)")
    bench.add_argument("--sections", default="inference,training",
                       help="comma-separated: inference, training, federation, scale (default inference,training)")
    bench.add_argument("--devices", default="auto",
                       help="comma-separated devices for inference and training, e.g. cuda (default auto: cpu, and cuda when present)")
    bench.add_argument("--scale-sites", default="8,16,33", help="site counts for the scale section (default 8,16,33; "
                       "empty: none)")
    bench.add_argument("--site-sizes", default="10,100,500",
                       help="scale section: cases at one site, each measured as the ClientApp process of a SuperNode "
                            "(default 10,100,500; empty: none)")
    bench.add_argument("--site-shape", default="240,240,155", help="scale section: the site's case size (default BraTS's)")
    bench.add_argument("--out", default="outputs/bench", help="output folder")
    bench.set_defaults(func=cmd_bench)

    models = sub.add_parser("models", help="list the registered models with their parameter counts")
    models.set_defaults(func=cmd_models)
    return parser


_SIGNAL = [signal.SIGINT]  # the signal that interrupted the command; its exit code is 128 + its number


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM: unwind as Ctrl-C does (KeyboardInterrupt), so every command's clean-up runs."""
    _SIGNAL[0] = signal.Signals(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so the SuperLinks, SuperNodes and simulations a command started are stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, RuntimeError, OSError) as exc:  # OSError: unreadable, missing or existing files, full disks
        print(f"fedlesion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfedlesion {args.command}: interrupted; files written so far are complete (each is written "
              "atomically).", file=sys.stderr)
        return 128 + _SIGNAL[0]


if __name__ == "__main__":
    sys.exit(main())
