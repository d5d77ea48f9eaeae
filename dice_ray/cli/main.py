"""``dice-ray``: the console entry point — ``dice-ray simulate|analyze|sweep …``.

Each subcommand is the same command line as its module (``python -m dice_ray.simulate``, ``python -m
dice_ray.analyze``, ``python -m dice_ray.sweep``), with the same options, exit statuses and one-line errors.
"""

from __future__ import annotations

import sys

COMMANDS = {"simulate": "run a simulation (python -m dice_ray.simulate)",
            "analyze": "reports from a run's tables (python -m dice_ray.analyze)",
            "sweep": "a hyper-parameter sweep on Ray Tune (python -m dice_ray.sweep)"}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to the subcommand's ``main``; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):  # asked for: the usage on stdout; missing: on stderr, as an error
        stream = sys.stdout if argv else sys.stderr
        print("usage: dice-ray {simulate,analyze,sweep} [options]   (dice-ray COMMAND --help for its options)\n",
              file=stream)
        for name, text in COMMANDS.items():
            print(f"  {name:<9} {text}", file=stream)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "simulate":
        from dice_ray.cli.simulate import main as run
    elif command == "analyze":
        from dice_ray.cli.analyze import main as run
    elif command == "sweep":
        from dice_ray.cli.sweep import main as run
    else:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    return run(rest, prog=f"dice-ray {command}")  # its usage and errors name this command


if __name__ == "__main__":
    sys.exit(main())
