"""The ``fedlesion`` command: one prefix, one verb per stage (nnU-Net style).

Each verb is a thin wrapper over a Python function that tests and scripts call directly.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any

from common.config import parse_shape


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import synthesize

    shape = parse_shape(args.shape)
    sites = synthesize(args.out, args.sites, args.cases_per_site, shape, args.seed)
    for site, cases in sites.items():
        print(f"site-{site}: {len(cases)} cases -> {Path(args.out) / f'site-{site}'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from server.strategy import format_table

    from .launch import read_history, run_federation

    overrides: dict[str, Any] = {}
    if args.run_config:
        overrides.update(tomllib.loads(Path(args.run_config).read_text()))
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    overrides["output-dir"] = args.out
    run_dir = run_federation(overrides, num_sites=args.sites, timeout_s=args.timeout)
    print(f"\nPer-round metrics of the global model (validation cases of every site, weighted by cases):\n")
    print(format_table(read_history(run_dir)))
    print(f"\nRun folder: {run_dir}\n  metrics.jsonl, metrics.csv, final.pt (global model), best.pt, last.pt, run_config.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    synth.add_argument("--cases-per-site", type=int, default=6,
                       help="mean cases per site; sizes range from 0.5x to 1.5x of it (default 6)")
    synth.add_argument("--shape", default="96,96,64", help="volume size X,Y,Z (default 96,96,64)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.set_defaults(func=cmd_synth)

    simulate = sub.add_parser("simulate", help="run the federation in simulation through `flwr run`",
                              description="Run the Flower app on Flower's simulation engine, one virtual SuperNode per "
                                          "site, on a private local SuperLink that is stopped afterwards. Without "
                                          "data-root the sites are synthetic and generated on first use.")
    simulate.add_argument("--sites", type=int, default=3, help="number of sites / virtual SuperNodes (default 3)")
    simulate.add_argument("--rounds", type=int, default=None, help="federated rounds (default: num-server-rounds)")
    simulate.add_argument("--run-config", help="a TOML preset of run-config values (see simulations/presets/)")
    simulate.add_argument("--set", action="append", metavar="KEY=VALUE",
                          help="override one run-config value, e.g. --set local-epochs=2 (repeatable)")
    simulate.add_argument("--out", default="outputs", help="output folder; the run folder is made inside (default outputs)")
    simulate.add_argument("--timeout", type=float, default=3600.0, help="stop the run after this many seconds")
    simulate.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"fedlesion {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
