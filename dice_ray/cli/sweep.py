"""``python -m dice_ray.sweep SWEEP.yaml``: run a sensitivity sweep of simulations on Ray Tune.

Examples::

    python -m dice_ray.sweep sweeps/lr_batch.yaml                 # the learning-rate x batch-size study
    python -m dice_ray.sweep sweeps/lr_batch.yaml --resume        # after an interruption: only missing trials
    python -m dice_ray.sweep sweeps/lr_batch.yaml --resume --retry-failed     # and the failed ones again
    python -m dice_ray.sweep my.yaml --out runs/sweeps/try2 --max-concurrent 4 --address auto

The sweep file names a base run config, a space over its fields and the search (see dice_ray/sweep/spec.py
and docs/how-to/sweeps.md). Every trial is a whole simulation; the sweep directory gets trials/<id>/ (the
trial's run directory and result.json), trials.parquet (one row per finished trial) and, with a plot: section,
summary.png. Bad input prints one line and exits with status 2 before anything is written; failed trials are
recorded (status failed, with the error) and do not stop the sweep.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from dice_ray.config import given_or_bundled
from dice_ray.errors import InputError, OneLineParser, Terminated, report, stops_on_sigterm
from dice_ray.sweep.runner import run_sweep
from dice_ray.sweep.spec import load_sweep


def build_parser(prog: str = "python -m dice_ray.sweep") -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = OneLineParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Run a sweep of simulations over a space of run-config fields on Ray Tune.",
                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("sweep", help="sweep file (YAML); sweeps/NAME.yaml or NAME: a bundled one, from any folder")
    parser.add_argument("--resume", action="store_true",
                        help="finish the sweep in its directory: skip trials with a recorded result")
    parser.add_argument("--retry-failed", action="store_true",
                        help="with --resume: run a grid's failed trials again too")
    parser.add_argument("--out", metavar="DIR", help="sweep directory (default: the sweep file's out)")
    parser.add_argument("--max-concurrent", type=int, metavar="N", help="trials running at once")
    parser.add_argument("--num-samples", type=int, metavar="N", help="trials of an optuna search")
    parser.add_argument("--address", metavar="ADDR",
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m dice_ray.sweep") -> int:
    """Command-line entry point; returns the exit status (2 for bad input)."""
    args = build_parser(prog).parse_args(argv)
    with stops_on_sigterm() as sigterm:  # a scheduler's stop ends the sweep as Ctrl-C does (it aborted in Ray's code)
        try:
            overrides = {"out": args.out, "max_concurrent": args.max_concurrent, "num_samples": args.num_samples}
            sweep = load_sweep(given_or_bundled(args.sweep, "sweeps", "sweep"), overrides)
            run_sweep(sweep, resume=args.resume, address=args.address, retry_failed=args.retry_failed)
        except InputError as err:
            return report(err)
        except KeyboardInterrupt as err:
            terminated = isinstance(err, Terminated) or sigterm.received  # (Tune raises its own on our Terminated)
            stopped = "terminated (SIGTERM)" if terminated else "interrupted"
            print(f"{stopped}{f' ({err})' if str(err) else ''}; continue with python -m dice_ray.sweep {args.sweep} "
                  f"--resume{resume_options(args)}", file=sys.stderr)
            return 143 if terminated else 130
    return 0


def resume_options(args: argparse.Namespace) -> str:
    """The options given to a sweep that its resume must repeat: ``--retry-failed`` and what overrides the sweep file
    (its directory, and its trials: a resume without ``--num-samples`` ran the file's number of trials)."""
    out = " --retry-failed" if args.retry_failed else ""
    for flag, value in (("--out", args.out), ("--num-samples", args.num_samples),
                        ("--max-concurrent", args.max_concurrent)):
        if value is not None:
            out += f" {flag} {shlex.quote(str(value))}"
    return out


if __name__ == "__main__":
    sys.exit(main())
