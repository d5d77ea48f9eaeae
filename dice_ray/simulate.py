"""``python -m dice_ray.simulate``: run synchronous adapt-then-communicate D-SGD (SPEC §1) on Ray.

Examples::

    python -m dice_ray.simulate                                  # 16 participants, embedded MNIST subset
    python -m dice_ray.simulate --nodes 256 --topology exponential
    python -m dice_ray.simulate --config configs/default.yaml --lr 0.1 --out runs/lr0.1

Every option overrides the matching field of the config file (``--config``); ``--set a.b=value``
overrides any field. Bad input prints one line and exits with status 2 before any work starts.
Results: a run directory with ``manifest.json``, ``rounds.parquet`` and ``nodes.parquet``; with
``--influence`` also ``influence.parquet`` and ``dice.parquet`` (DICE-GT and DICE-E of every probe); with
``--proximal`` ``proximal.parquet`` (every examiner's score of every in-neighbour); with ``--rewire``
``rewiring.parquet`` (collaborator selection's history).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import yaml

from dice_ray import __version__
from dice_ray.config import RunConfig, build_config, load_config, set_dotted
from dice_ray.errors import InputError
from dice_ray.experiment import Experiment, prepare
from dice_ray.proximal import ProximalLedger
from dice_ray.results import (
    DICE,
    INFLUENCE,
    NODES,
    PROXIMAL,
    REWIRING,
    ROUNDS,
    TableWriter,
    write_json_atomic,
    write_table_atomic,
)
from dice_ray.rewiring import Rewirer, rewired_rounds

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
    ("--optimizer", "optim.name", str), ("--lr", "optim.lr", float), ("--batch-size", "optim.batch_size", int),
    ("--momentum", "optim.momentum", float), ("--weight-decay", "optim.weight_decay", float),
    ("--actors", "engine.actors", int), ("--cpus-per-actor", "engine.cpus_per_actor", float),
    ("--gpus-per-actor", "engine.gpus_per_actor", float), ("--address", "engine.address", str),
    ("--out", "output.out", str), ("--eval-every", "output.eval_every", int),
    ("--hops", "influence.hops", int), ("--probe-rounds", "influence.rounds", "int-list"),
    ("--probe-every", "influence.every", int), ("--probe-sources", "influence.sources", "int-list"),
    ("--probe-samples", "influence.probe_samples", int), ("--zprime", "influence.zprime", str),
    ("--misbehavior", "misbehavior.kind", str), ("--misbehaving", "misbehavior.count", int),
    ("--misbehaving-fraction", "misbehavior.fraction", float),
    ("--misbehaving-selection", "misbehavior.selection", str), ("--misbehaving-ids", "misbehavior.ids", "int-list"),
    ("--proximal-every", "proximal.every", int), ("--proximal-zprime", "proximal.zprime", str),
    ("--proximal-window", "proximal.window", int),
    ("--rewire", "rewiring.mode", str), ("--rewire-every", "rewiring.every", int),
    ("--rewire-keep", "rewiring.keep", int), ("--rewire-candidates", "rewiring.candidates", int),
    ("--rewire-seed", "rewiring.seed", int),
]
SWITCHES: list[tuple[str, str, bool]] = [
    ("--download", "data.download", True), ("--overwrite", "output.overwrite", True),
    ("--no-progress", "output.progress", False), ("--influence", "influence.enabled", True),
    ("--proximal", "proximal.enabled", True),
]


def _field_help(dotted: str) -> str:
    model: Any = RunConfig
    *parents, leaf = dotted.split(".")
    for p in parents:
        model = model.model_fields[p].annotation
    field = model.model_fields[leaf]
    default = field.default_factory() if field.default_factory else field.default
    return f"{field.description} [config {dotted}, default {default}]".replace("%", "%%")  # argparse formats help


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; every option documents the config field it sets."""
    parser = _Parser(prog="python -m dice_ray.simulate", formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Run synchronous adapt-then-communicate decentralized SGD over a topology, on Ray, "
                     "and write the run's tables to a run directory.", epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", metavar="FILE", help="YAML run config (see configs/)")
    for flag, dotted, kind in OPTIONS:
        names = {int: "INT", float: "FLOAT", "int-list": "INT,INT,..."}
        metavar = names.get(kind, "DIR" if flag == "--out" else "NAME")
        parser.add_argument(flag, dest=dotted, type=_int_list if kind == "int-list" else kind, default=None,
                            help=_field_help(dotted), metavar=metavar)
    for flag, dotted, value in SWITCHES:
        text = _field_help(dotted) if value else f"do not: {_field_help(dotted)}"
        parser.add_argument(flag, dest=dotted, action="store_const", const=value, default=None, help=text)
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override any config field, e.g. --set optim.betas=[0.9,0.99]")
    parser.add_argument("--engine", choices=("ray", "local"), default="ray",
                        help="ray: participant-group actors; local: one process, no Ray (debugging)")
    parser.add_argument("--save-states", action="store_true",
                        help="also save the final states of all participants to states.npy")
    return parser


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Return the validated config: ``--config`` file, then options, then ``--set`` overrides."""
    data = load_config(args.config) if args.config else {}
    for _, dotted, *_ in [*OPTIONS, *SWITCHES]:
        value = getattr(args, dotted)
        if value is not None:
            set_dotted(data, dotted, value)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    return build_config(data)


def run_directory(config: RunConfig) -> Path:
    """Return the run directory to create; refuse to reuse a non-empty one without ``overwrite``."""
    out = config.output.out or (
        f"runs/{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{config.topology.name}-n{config.nodes}"
    )
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {out!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not config.output.overwrite:
        raise InputError(f"run directory {out!r} already exists and is not empty; pass --overwrite or "
                         "choose another --out")
    return path


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch

    return {"dice_ray": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _append_rows(columns: dict[str, list], metrics: Any, n: int) -> None:
    """Append round ``metrics`` as N rows of ``rounds.parquet`` (None where not evaluated)."""
    cd = metrics.consensus_distance
    values = {"round": [metrics.round] * n, "node": range(n), "train_loss": metrics.train_loss.tolist(),
              "consensus_distance": [cd] * n}
    for key in ("val_loss", "val_acc", "heldout_loss", "heldout_acc"):
        array = getattr(metrics, key)
        values[key] = [None] * n if array is None else array.tolist()
    for key, column in values.items():
        columns.setdefault(key, []).extend(column)


def _nodes_table(experiment: Experiment, blocks: list[np.ndarray]) -> dict[str, Any]:
    w = experiment.topology.mixing_matrix(0)
    actor = np.zeros(experiment.nodes, np.int32)
    for i, block in enumerate(blocks):
        actor[block] = i
    return {
        "node": np.arange(experiment.nodes, dtype=np.int32),
        "n_train": [len(t) for t in experiment.partition.train],
        "n_val": [len(v) for v in experiment.partition.val],
        "q": experiment.q,
        "in_degree": np.asarray(experiment.topology.adjacency(0).sum(axis=1)).ravel(),
        "self_weight": w.diagonal(),
        "actor": actor,
        "misbehaving": np.isin(np.arange(experiment.nodes), experiment.misbehaving),
    }


def _measure_influence(experiment: Experiment, engine_kind: str) -> tuple[list[dict], list[dict]]:
    """DICE-GT and DICE-E of every probe: Ray tasks in parallel, or in this process for ``--engine local``."""
    from tqdm import tqdm

    config = experiment.config
    if engine_kind == "local":
        from dice_ray.influence.measure import measure_influence_here

        return measure_influence_here(experiment)
    from dice_ray.engine.influence import measure_influence

    bar = tqdm(unit="task", desc="influence", disable=not config.output.progress, dynamic_ncols=True,
               file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        return measure_influence(experiment, progress)
    finally:
        bar.close()


def simulate(config: RunConfig, engine_kind: str = "ray", save_states: bool = False,
             experiment: Experiment | None = None) -> Path:
    """Run the simulation of ``config``; return its run directory (see the module docstring)."""
    experiment = experiment or prepare(config)
    out = run_directory(config)
    started = time.time()

    if engine_kind == "local":
        from dice_ray.engine import LocalEngine

        engine: Any = LocalEngine(experiment)
        blocks = [np.arange(config.nodes)]
    else:
        from dice_ray.engine import RayEngine, start_ray

        start_ray(config.engine.address)
        engine = RayEngine(experiment)
        blocks = engine.plan.blocks

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("rounds.parquet", "nodes.parquet", "states.npy", "influence.parquet", "dice.parquet",
                  "proximal.parquet", "rewiring.parquet"):
        (out / stale).unlink(missing_ok=True)
    manifest: dict[str, Any] = {
        "status": "running", "config": config.model_dump(mode="json"), "seed": config.seed,
        "versions": _versions(), "host": platform.node(), "argv": sys.argv,
        "start_time": dt.datetime.now(dt.timezone.utc).isoformat(), "engine": engine_kind,
        "actors": len(blocks), "topology": experiment.topology.describe(),
        "data": {"dataset": config.data.dataset, "n_train": int(len(experiment.dataset.y_train)),
                 "n_test": int(len(experiment.dataset.y_test)), "heldout": int(len(experiment.heldout[1])),
                 "input_shape": list(experiment.dataset.input_shape),
                 "num_classes": experiment.dataset.num_classes},
        "model": {"name": config.model.name, "parameters": experiment.param_count},
        "misbehaving": experiment.misbehaving.tolist(),
    }
    write_json_atomic(out / "manifest.json", manifest)

    from tqdm import tqdm

    n, rounds, every = config.nodes, config.rounds, config.output.eval_every
    bar = tqdm(total=rounds, unit="round", disable=not config.output.progress, dynamic_ncols=True,
               file=sys.stderr)
    ledger = (ProximalLedger(n, experiment.q, experiment.misbehaving, config.proximal.window)
              if config.proximal.enabled else None)
    rewirer = (Rewirer(config, experiment.topology.mixing_matrix(0), ledger)
               if config.rewiring.mode != "none" else None)
    proximal_table = TableWriter(out / "proximal.parquet", PROXIMAL) if ledger else None
    try:
        with TableWriter(out / "rounds.parquet", ROUNDS) as rounds_table:
            pending: dict[str, list] = {}
            schedule = ((t, (t + 1) % every == 0 or t == rounds - 1) for t in range(rounds))
            for m in rewired_rounds(engine, schedule, rewirer):
                t = m.round
                if not np.isfinite(m.train_loss).all():
                    bad = np.flatnonzero(~np.isfinite(m.train_loss))[:5].tolist()
                    raise FloatingPointError(f"round {t}: non-finite training loss at participants {bad}")
                _append_rows(pending, m, n)
                if m.proximal is not None:
                    proximal_table.write(ledger.rows(t, m.proximal))
                if len(pending["node"]) >= 65_536 or t == rounds - 1:
                    rounds_table.write(pending)
                    pending = {}
                post = {"loss": f"{m.train_loss.mean():.4f}"}
                if m.heldout_acc is not None:
                    post["acc"] = f"{m.heldout_acc.mean():.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update()
        bar.close()
        if proximal_table:
            proximal_table.close()
        if rewirer:
            write_table_atomic(out / "rewiring.parquet", rewirer.history, REWIRING)
            manifest["rewiring_fallbacks"] = rewirer.fallbacks
        write_table_atomic(out / "nodes.parquet", _nodes_table(experiment, blocks), NODES)
        if save_states:
            np.save(out / "states.npy", engine.states())
        actor_info = engine.info() if hasattr(engine, "info") else []
        engine.close()  # frees the actors' CPUs for the influence tasks
        if config.influence.enabled:
            influence_rows, dice_rows = _measure_influence(experiment, engine_kind)
            write_table_atomic(out / "influence.parquet", influence_rows, INFLUENCE)
            write_table_atomic(out / "dice.parquet", dice_rows, DICE)
    except BaseException as err:
        bar.close()
        if proximal_table and not proximal_table.path.exists():
            proximal_table.abort()
        manifest.update(status="interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
                        error=f"{type(err).__name__}: {err}",
                        end_time=dt.datetime.now(dt.timezone.utc).isoformat())
        write_json_atomic(out / "manifest.json", manifest)
        engine.close()
        raise

    wall = time.time() - started
    actor_peaks = [a["peak_rss_mib"] for a in actor_info]
    manifest.update(
        status="complete", end_time=dt.datetime.now(dt.timezone.utc).isoformat(), wall_seconds=wall,
        rounds_per_second=rounds / wall, peak_rss_mib={"driver": _peak_rss_mib(), "actors": actor_peaks},
        placement=actor_info,
        final={"heldout_acc_mean": float(np.mean(m.heldout_acc)), "heldout_loss_mean": float(np.mean(m.heldout_loss)),
               "consensus_distance": m.consensus_distance},
    )
    write_json_atomic(out / "manifest.json", manifest)
    print(f"done: {rounds} rounds x {n} participants in {wall:.1f} s ({rounds / wall:.2f} rounds/s); "
          f"final held-out accuracy {np.mean(m.heldout_acc):.3f}; peak memory: driver "
          f"{_peak_rss_mib():.0f} MiB" + (f", actors {sum(actor_peaks):.0f} MiB in total "
                                          f"(largest {max(actor_peaks):.0f} MiB)" if actor_peaks else "")
          + f"; results in {out}/", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args)
        experiment = prepare(config)
        run_directory(config)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        simulate(config, args.engine, args.save_states, experiment)
    except FloatingPointError as err:  # diverged: the manifest says so, no table reads as complete
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
