"""``python -m dice_ray.simulate``: run synchronous adapt-then-communicate D-SGD (concepts §1) on Ray.

Examples::

    python -m dice_ray.simulate                                  # 16 participants, embedded MNIST subset
    python -m dice_ray.simulate --nodes 256 --topology exponential
    python -m dice_ray.simulate --config configs/default.yaml --lr 0.1 --out runs/lr0.1

Every option overrides the matching field of the config file (``--config``); ``--set a.b=value``
overrides any field. A method registered by a module the command line imports (``--imports mymod``, or the config's
``imports``) gets a flag per option, ``--<method>-<field>``. Bad input prints one line and exits with status 2
before any work starts.
Results: a run directory with ``manifest.json``, ``rounds.parquet`` and ``nodes.parquet``; with
``--influence`` also ``influence.parquet`` and ``dice.parquet`` (DICE-GT and DICE-E of every probe); with
``--proximal`` ``proximal.parquet`` (every examiner's score of every in-neighbour); with ``--rewire``
``rewiring.parquet`` (collaborator selection's history); with ``--ledger`` ``contributions.parquet`` (the online
contribution ledger L[j→k]) and ``shares.parquet``; with ``--loo`` also ``loo.parquet`` (leave-one-participant-out
retraining, Ray tasks) and with ``--shapley K`` ``shapley.parquet``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import yaml

from dice_ray.config import (
    RESUME_FIELDS,
    RunConfig,
    apply_sets,
    build_config,
    given_or_bundled,
    import_modules,
    load_config,
    load_yaml,
    modules_in,
    modules_named,
    refuse_idle_settings,
    set_dotted,
    yaml_error,
)
from dice_ray.errors import InputError, OneLineParser, Terminated, first_line, report, stops_on_sigterm
from dice_ray.hooks import registered_methods
from dice_ray.sections import comma_list

# (flag, dotted config field, type). Help texts come from the config fields' descriptions.
OPTIONS: list[tuple[str, str, Any]] = [
    ("--nodes", "nodes", int), ("--rounds", "rounds", int), ("--seed", "seed", int),
    ("--topology", "topology.name", str), ("--weights", "topology.weights", str),
    ("--edge-probability", "topology.p", float), ("--grid-rows", "topology.rows", int),
    ("--topology-file", "topology.file", str),
    ("--dataset", "data.dataset", str), ("--data-dir", "data.data_dir", str),
    ("--partition", "data.partition", str), ("--alpha", "data.alpha", float),
    ("--shards-per-node", "data.shards_per_node", int), ("--val-fraction", "data.val_fraction", float),
    ("--heldout-size", "data.heldout_size", int), ("--participant-weights", "data.participant_weights", str),
    ("--model", "model.name", str), ("--init", "model.init", str), ("--vectorize", "model.vectorize", str),
    ("--conv", "model.conv", str), ("--pool", "model.pool", str),
    ("--optimizer", "optim.name", str), ("--lr", "optim.lr", float), ("--batch-size", "optim.batch_size", int),
    ("--momentum", "optim.momentum", float), ("--weight-decay", "optim.weight_decay", float),
    ("--actors", "engine.actors", int), ("--cpus-per-actor", "engine.cpus_per_actor", float),
    ("--gpus-per-actor", "engine.gpus_per_actor", float), ("--precision", "engine.precision", str),
    ("--gpus-per-task", "engine.gpus_per_task", float),
    ("--transport", "engine.transport", str),
    ("--address", "engine.address", str),
    ("--out", "output.out", str), ("--eval-every", "output.eval_every", int),
    ("--checkpoint-every", "output.checkpoint_every", int),
    ("--hops", "influence.hops", int), ("--probe-rounds", "influence.rounds", "int-list"),
    ("--probe-every", "influence.every", int), ("--probe-last", "influence.last", int),
    ("--probe-sources", "influence.sources", "int-list"), ("--sample-sources", "influence.sample_sources", int),
    ("--probe-samples", "influence.probe_samples", int), ("--zprime", "influence.zprime", str),
    ("--variants", "influence.variants", str),
    ("--misbehavior", "misbehavior.kind", str), ("--misbehaving", "misbehavior.count", int),
    ("--misbehaving-fraction", "misbehavior.fraction", float),
    ("--misbehaving-selection", "misbehavior.selection", str), ("--misbehaving-ids", "misbehavior.ids", "int-list"),
    ("--proximal-every", "proximal.every", int), ("--proximal-zprime", "proximal.zprime", str),
    ("--proximal-window", "proximal.window", int),
    ("--rewire", "rewiring.mode", str), ("--rewire-every", "rewiring.every", int),
    ("--rewire-keep", "rewiring.keep", int), ("--rewire-candidates", "rewiring.candidates", int),
    ("--rewire-seed", "rewiring.seed", int),
    ("--ledger-every", "ledger.every", int), ("--ledger-hops", "ledger.hops", int),
    ("--ledger-zprime", "ledger.zprime", str), ("--shapley", "ledger.shapley_permutations", int),
    ("--ledger-variants", "ledger.variants", str),
    ("--shrink-ids", "data.shrink.ids", "int-list"), ("--shrink-fraction", "data.shrink.fraction", float),
    ("--log", "output.log", str), ("--imports", "imports", "list"),
]
SWITCHES: list[tuple[str, str, bool]] = [
    ("--download", "data.download", True), ("--overwrite", "output.overwrite", True),
    ("--no-progress", "output.progress", False), ("--influence", "influence.enabled", True),
    ("--online-dice", "influence.online", True),
    ("--keep-checkpoints", "output.keep_checkpoints", True), ("--proximal", "proximal.enabled", True),
    ("--ledger", "ledger.enabled", True), ("--loo", "ledger.loo", True),
    ("--no-cuda-graphs", "engine.cuda_graphs", False),
]


def _section(parents: list[str]) -> Any:
    """The config section (pydantic model) at the dotted path ``parents`` (``[]``: RunConfig; ``["optim"]``; a
    registered user method's options)."""
    sections = {m.name: m.options for m in registered_methods() if m.options is not None}
    model: Any = sections[parents[0]] if parents and parents[0] in sections else RunConfig
    for p in parents[1 if model is not RunConfig else 0:]:
        model = model.model_fields[p].annotation
    return model


def _field_help(dotted: str) -> str:
    *parents, leaf = dotted.split(".")
    field = _section(parents).model_fields[leaf]
    default = field.default_factory() if field.default_factory else field.default
    if isinstance(default, (list, tuple)):  # as the flag takes it: comma-separated
        default = ",".join(str(v) for v in default) or "none"
    said = "(default" in (field.description or "")  # the description says what None means
    where = f"config {dotted}" + ("" if said and default is None else f", default {default}")
    return f"{field.description} [{where}]".replace("%", "%%")  # argparse formats help


def _group_title(section: str) -> str:
    """A help group's title: the config section's name and the first sentence of its docstring."""
    if section == "run":
        return "run: participants, rounds, seed and what to import"
    doc = (_section([section]).__doc__ or "").strip().split("\n\n")[0]
    first = " ".join(doc.replace("``", "").split()).split(". ")[0].rstrip(".")
    return f"{section}: {first}" if first else section  # (a user's options class without a docstring)


def method_options() -> list[tuple[str, str, Any]]:
    """The flags of registered user methods' options (``hooks.register_method``), generated from their fields:
    ``--<method>-<field>`` (underscores as dashes) sets ``<method>.<field>``, read as the built-in flags of that type
    read theirs (``_flag_kind``: ``INT``, ``FLOAT``, ``INT,INT,...``, ``NAME,NAME,...``), anything else as YAML
    (``{a: 1}``, and an optional field's ``null``)."""
    return [(f"--{m.name}-{name}".replace("_", "-"), f"{m.name}.{name}", _flag_kind(field.annotation))
            for m in registered_methods() if m.options is not None for name, field in m.options.model_fields.items()]


def _flag_kind(annotation: Any) -> Any:
    """How a flag reads a field of type ``annotation``: int, float, "int-list", "float-list", "list" (of names),
    "bool" (true or false) or "yaml" (anything else); ``X | None``: ("null", X's kind), which also reads ``null``."""
    args = list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _flag_kind(next(a for a in args if a is not type(None)))
        return "yaml" if inner == "yaml" else ("null", inner)
    if annotation in (int, float):
        return annotation
    if annotation is bool:
        return "bool"
    if typing.get_origin(annotation) is list and args in ([int], [float], [str]):
        return {int: "int-list", float: "float-list", str: "list"}[args[0]]
    return "yaml"


def import_named(argv: list[str] | None) -> None:
    """Import the modules a command line names (``--imports``, ``--config``'s ``imports`` and ``model.import_module``,
    ``--set imports=…``) before its parser is built, so that the methods they register have their flags; raise
    ``InputError`` for a module that cannot be imported or a config file that cannot be read."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--config", "--imports", "--resume"):
        pre.add_argument(flag)
    pre.add_argument("--set", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    if known.resume:
        return  # a resumed run's modules are imported only with --allow-imports, by resume itself
    data = load_config(given_or_bundled(known.config, "configs", "config")) if known.config else {}
    if known.imports:
        data["imports"] = comma_list(known.imports)
    apply_sets(data, [item for item in known.set if item.split("=")[0].strip() in ("imports", "model.import_module")])
    import_modules(modules_in(data))


# What a str option takes, where it is not a name: a path, or names separated by commas.
_METAVARS = {"--address": "HOST:PORT", "--out": "DIR", "--data-dir": "DIR", "--topology-file": "FILE",
             "--variants": "NAME,NAME,...", "--ledger-variants": "NAME,NAME,...", "--log": "NAME,NAME,..."}


def _yaml_value(text: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.YAMLError as err:  # argparse makes a usage error of this one only
        raise argparse.ArgumentTypeError(f"not YAML ({yaml_error(err)})") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _or_null(read: Callable[[str], Any], text: str) -> Any:
    """``read(text)``, or None for ``null`` (an optional field of a method)."""
    return None if text.strip().lower() in ("null", "none", "~") else read(text)


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser(prog: str = "python -m dice_ray.simulate") -> argparse.ArgumentParser:
    """Return the command-line parser; every option documents the config field it sets."""
    epilog = __doc__.split("\n\n", 1)[1].replace("::\n", ":\n").replace("``", "")  # the docstring's markup, plain
    parser = OneLineParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Run synchronous adapt-then-communicate decentralized SGD over a topology, on "
                           "Ray, and write the run's tables to a run directory.", epilog=epilog)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML run config; configs/NAME.yaml or NAME: a bundled one, from any folder")
    groups: dict[str, Any] = {}

    def group(dotted: str) -> Any:  # one help group per config section, in the order they come
        section = dotted.split(".")[0] if "." in dotted else "run"
        if section not in groups:
            groups[section] = parser.add_argument_group(_group_title(section))
        return groups[section]

    for _, dotted, _ in [*OPTIONS, *method_options()]:
        group(dotted)  # the groups in the order of the options
    for flag, dotted, value in SWITCHES:  # a method's switch first, then its options
        text = _field_help(dotted) if value else f"turn this off: {_field_help(dotted)}"
        group(dotted).add_argument(flag, dest=dotted, action="store_const", const=value, default=None, help=text)
    names = {int: "INT", float: "FLOAT", "int-list": "INT,INT,...", "float-list": "FLOAT,FLOAT,...",
             "list": "NAME,NAME,...", "yaml": "VALUE", "bool": "true|false"}
    kinds = {"int-list": _int_list, "float-list": _float_list, "list": comma_list, "yaml": _yaml_value,
             "bool": _yaml_value}
    for flag, dotted, kind in [*OPTIONS, *method_options()]:
        nullable = isinstance(kind, tuple)
        kind = kind[1] if nullable else kind
        metavar = names.get(kind, _METAVARS.get(flag, "NAME")) + ("|null" if nullable else "")
        read = kinds.get(kind, kind)
        alone = {"nargs": "?", "const": True} if kind == "bool" and not nullable else {}  # a bare switch means true
        group(dotted).add_argument(flag, dest=dotted, type=functools.partial(_or_null, read) if nullable else read,
                                   default=None, help=_field_help(dotted), metavar=metavar, **alone)
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override any config field, e.g. --set optim.betas=[0.9,0.99]")
    parser.add_argument("--engine", choices=("ray", "local"), default=None,
                        help="ray (default): participant-group actors, and the work after training (DICE-GT replays, "
                             "retraining) as parallel Ray tasks; local: everything in this process, in turn (no Ray "
                             "start: quicker for a short run, slower replays where there are several CPUs)")
    parser.add_argument("--save-states", action="store_true",
                        help="also save the final states of all participants to states.npy")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run from its last checkpoint, with its own config (only "
                        f"{', '.join(RESUME_FLAGS)} and --allow-imports may be given too)")
    parser.add_argument("--allow-imports", action="store_true",
                        help="with --resume: import the modules the run's config names (imports, "
                        "model.import_module); without it such a run is refused, naming them")
    return parser


# Options a resumed run may set (``RESUME_FIELDS``): where and how it runs, never what it computes.
RESUME_FLAGS = (*(flag for flag, dotted, *_ in [*OPTIONS, *SWITCHES] if dotted in RESUME_FIELDS), "--engine")


def resume_args(args: argparse.Namespace) -> dict[str, Any]:
    """Return the placement options of ``args`` for ``resume_config`` (dotted field -> value); raise ``InputError``
    if ``args`` set anything that would change what the resumed run computes."""
    flags = {dotted: flag for flag, dotted, *_ in [*OPTIONS, *SWITCHES, *method_options()]}
    refused = [flags[d] for d in flags if getattr(args, d) is not None and flags[d] not in RESUME_FLAGS]
    refused += ["--config"] * bool(args.config) + ["--set"] * bool(args.set) + ["--save-states"] * args.save_states
    if refused:
        raise InputError(f"--resume continues the run with its own config; {', '.join(refused)} cannot change it "
                         f"(only {', '.join(RESUME_FLAGS)})")
    return {dotted: getattr(args, dotted) for dotted in flags if getattr(args, dotted) is not None}


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Return the validated config: ``--config`` file, then options, then ``--set`` overrides."""
    data = load_config(given_or_bundled(args.config, "configs", "config")) if args.config else {}
    for _, dotted, *_ in [*OPTIONS, *SWITCHES, *method_options()]:
        value = getattr(args, dotted)
        if value is not None:
            set_dotted(data, dotted, value)
    if getattr(args, "misbehavior.ids") is not None and getattr(args, "misbehavior.selection") is None:
        set_dotted(data, "misbehavior.selection", "ids")  # --misbehaving-ids names who: selection ids
    flags = {dotted: flag for flag, dotted, *_ in [*OPTIONS, *SWITCHES, *method_options()]
             if getattr(args, dotted) is not None}
    set_keys = {item.partition("=")[0].strip(): item for item in args.set}
    both = [dotted for dotted in flags if dotted in set_keys]
    if both:
        raise InputError(f"{flags[both[0]]} and --set {set_keys[both[0]]} both set {both[0]}: give one")
    config = build_config(apply_sets(data, args.set))
    # (a config file may keep settings that do nothing in this run)
    refuse_idle_settings(config, flags | {key: f"--set {key}" for key in set_keys}, args.engine or "ray")
    return config


def main(argv: list[str] | None = None, prog: str = "python -m dice_ray.simulate") -> int:
    """Command-line entry point, a thin layer over ``dice_ray.run`` / ``dice_ray.resume``; returns the exit status
    (2 for bad input, found before any work starts; 1 for a run that failed)."""
    from dice_ray import api
    from dice_ray.runner import run_directory

    try:
        import_named(argv)
    except InputError as err:
        return report(err)
    args = build_parser(prog).parse_args(argv)
    out = args.resume
    allow = " --allow-imports" if args.allow_imports else ""  # the resume of a run whose config imports modules
    with stops_on_sigterm() as sigterm:  # SIGTERM stops the run as Ctrl-C does (it was left "running", no line)
        try:
            if args.resume:
                placement = {dotted.replace(".", "__"): value for dotted, value in resume_args(args).items()}
                api.resume(args.resume, engine=args.engine, allow_imports=args.allow_imports, **placement)
            else:
                if args.allow_imports:
                    raise InputError("--allow-imports applies to --resume only (a new run imports what its own config "
                                     "names)")
                config = resolve_config(args)
                allow = " --allow-imports" if modules_named(config) else ""
                out = str(run_directory(config))
                config = config.model_copy(update={"output": config.output.model_copy(update={"out": out})})
                api.run(config, engine=args.engine or "ray", save_states=args.save_states)
        except InputError as err:
            return report(err)
        except FloatingPointError as err:  # diverged: the manifest says so, no table reads as complete
            print(f"error: training diverged: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the manifest says "interrupted"; resume from a checkpoint
            terminated = isinstance(err, Terminated) or sigterm.received  # (inside ray.get: Ray raises its own)
            stopped = "terminated (SIGTERM)" if terminated else "interrupted"
            print(stopped + (f"; continue with python -m dice_ray.simulate --resume {out}{allow}" if out else ""),
                  file=sys.stderr)
            return 143 if terminated else 130
        except MemoryError as err:  # past the up-front checks (those count the states, not a run's peak): one line
            print(f"error: out of memory ({first_line(err)[:200]}): fewer participants (--nodes), a smaller model, or "
                  "more machines (docs: how-to/cluster)", file=sys.stderr)
            return 1
        except OSError as err:  # a full disk, a folder gone read-only: no table reads as complete
            where = f" ({err.filename})" if err.filename else ""
            print(f"error: cannot write the run directory {out}: {err.strerror or err}{where}; fix that, then continue "
                  f"with --resume {out}{allow}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
