"""``python -m dice_ray.analyze REPORT RUN_DIR``: reports computed from a run's tables.

    python -m dice_ray.analyze alignment runs/my-run     # DICE-E against DICE-GT, per hop and variant
    python -m dice_ray.analyze cascade runs/my-run       # ripples: influence against hop distance, position
    python -m dice_ray.analyze cascade runs/ring runs/exp       # ... of each, and their decay in one figure
    python -m dice_ray.analyze anomaly runs/my-run       # detection of misbehaving neighbours (--proximal)
    python -m dice_ray.analyze collaborators runs/a runs/b ...  # final accuracy: static vs rewired topologies
    python -m dice_ray.analyze contributions runs/my-run [--loo] [--shapley K]  # contribution ledger (--ledger)

Each report is computed by ``dice_ray.reports`` (as DataFrames, the same data ``dice_ray.Run``'s report methods
return); this front end prints it and writes its tables and PNGs into the run directory.

``alignment`` reads ``dice.parquet`` and ``influence.parquet`` and prints, for every hop r and DICE-E
variant, Pearson, Spearman and Kendall correlation with DICE-GT and the relative error Σ|GT − E| / Σ|GT|,
for three quantities: the hop-r term alone (Σ over participants first reached at hop r), the cumulative
DICE^{(r)}, and every per-participant term d_k^{(r)} (k within r hops of the source, itself included). It writes
them to ``alignment.parquet`` and a GT-vs-E scatter per hop to ``alignment_hop{r}.png`` in the run directory.

``cascade`` reads ``influence.parquet`` (whole-batch probes; DICE-GT where measured, else the second-order,
exact-readout, curvature or first-order estimate) and reports how influence decays with hop distance
(``cascade.parquet``, ``cascade_decay.png``), how a source's total influence relates to its degree and centrality
(networkx), the pairwise matrix I_{j→k} after R rounds (``pairwise.parquet``, ``pairwise_heatmap.png``) and its
reciprocity: the correlation of I_{j→k} with I_{k→j}. Given several runs (or ``--out``), it reports each and draws
their decay at step R in one figure, ``cascade_comparison.png`` in ``--out`` (default: the runs' common parent).

``anomaly`` reads ``proximal.parquet`` (a run with ``--proximal`` and misbehaving participants) and ranks every
examiner's in-neighbours by cumulative proximal influence, by its windowed sum, and by two baselines from the
same run: the neighbour's own training loss and the cosine distance of its update from the examiner's. It
reports ROC AUC overall and per examiner, precision at the true number of anomalous neighbours and the
detection delay (``anomaly.parquet``, ``anomaly_roc.png``).

``collaborators`` reads several runs that differ in ``rewiring.mode`` (none, influence, outlier, random), misbehaviour
and seed, and compares the final mean held-out accuracy of the honest participants
(``collaborators.parquet``).

``contributions`` reads ``shares.parquet`` and ``contributions.parquet`` (a run with ``--ledger``) and ranks the
participants by their ledger total T_j, with their share of the helpful budget and the harmful flag, beside
their data size, misbehaviour and position (in-degree, betweenness). Where leave-one-participant-out retraining
(``loo.parquet``; ``--loo`` computes it now, as Ray tasks, if the run did not) and Monte-Carlo Shapley
(``shapley.parquet``; ``--shapley K``) exist, it reports Spearman and Kendall correlation of T_j with them. A run
without the ledger is ranked by the same rule on its leave-one-out effects (else its Shapley values). It writes
``contributions_report.parquet``, a bar chart of the shares (``contributions_shares.png``) and the heat-map of
L[j→k] (``contributions_heatmap.png``; without the ledger, of the leave-one-out effects).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from dice_ray.errors import InputError, OneLineParser, absent, report
from dice_ray.reports import (
    Cascade,
    Contributions,
    alignment_report,
    cascade_report,
    collaborators_report,
    contributions_report,
    detection_report,
    plots,
    write_report,
)
from dice_ray.reports.collaborators import common_parent
from dice_ray.reports.inputs import recorded_config
from dice_ray.results import VARIANT_SUFFIX
from dice_ray.rundir import check_can_make


def _cells(column: pd.Series) -> pd.Series:
    """A column as printed: floats to 4 decimals, a missing value as '-'."""
    return column.map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.4f}" if isinstance(v, float) else v)


def _records(frame: pd.DataFrame) -> list[dict]:
    """The rows of ``frame`` as dicts, None where a value is missing."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _correlations(values: dict[str, float | None]) -> str:
    """Named rank correlations on one line; "-" where there is none, said once (a side with one value for every
    participant, as every position measure on a ring, or fewer than 3 participants)."""
    line = "  ".join(f"{k}: {_number(v, '.3f')}" for k, v in values.items())
    said = "  (-: the same value for every participant, which ranks nothing)"
    return line + (said if None in values.values() else "")


def alignment(run: Path) -> list[dict]:
    """Compute, write and print the alignment report of ``run``; return its rows."""
    computed = alignment_report(run)
    pngs = write_report(computed, run)[1:]
    rows = _records(computed.table)
    print(f"{'hops':>4} {'quantity':>10} {'variant':>12} {'probes':>6} {'pearson':>8} {'spearman':>8} "
          f"{'kendall':>8} {'rel.err':>8} {'correct.':>8}")
    for row in rows:
        cells = [f"{row[k]:8.4f}" if row[k] is not None else f"{'-':>8}"
                 for k in ("pearson", "spearman", "kendall", "relative_error", "correction")]
        print(f"{row['hops']:>4} {row['quantity']:>10} {row['variant']:>12} {row['probes']:>6} " + " ".join(cells))
    outside = sorted({(row["variant"], row["hops"]) for row in rows if (row["correction"] or 0) >= CORRECTION_LIMIT})
    if outside:  # a higher-order part as large as the first-order term: the expansion is not to be read there
        print(f"note: {', '.join(f'{v} at hop {r}' for v, r in outside)}: the part beyond first order is at least "
              f"{CORRECTION_LIMIT:g}x the first-order term (correct.): outside the expansion; read DICE-GT there "
              "(see docs: concepts, 'When the estimate holds')")
    print(f"wrote {run / 'alignment.parquet'} and {', '.join(p.name for p in pngs)}")
    return rows


def cascades(runs: list[Path], out: Path | None = None) -> list[Cascade]:
    """The cascade report of each of ``runs`` (``cascade``); of several, also their decay curves in one figure,
    ``cascade_comparison.png`` in ``out`` (default: the runs' common parent folder)."""
    if len(runs) == 1 and out is None:
        return [cascade(runs[0])]
    parent = common_parent(runs)  # the default folder; labels are the runs' paths from it (one name stays apart)
    reports = [cascade_report(run) for run in runs]  # every run read and checked before anything is written
    out = _out_folder(out or parent)
    computed = []
    for run, checked in zip(runs, reports, strict=True):
        print(f"== {run}")
        computed.append(cascade(run, checked))
    labels = [f"{run.resolve().relative_to(parent)} ({recorded_config(run).topology.name}, {c.value}, "
              f"R = {c.last_step})" for run, c in zip(runs, computed, strict=True)]
    plots.cascade_comparison({label: c.decay[c.decay["step"] == c.last_step] for label, c in
                              zip(labels, computed, strict=True)}, out / "cascade_comparison.png")
    print(f"wrote {out / 'cascade_comparison.png'}: mean |influence| by hop distance of " + "; ".join(labels))
    return computed


def _out_folder(out: Path) -> Path:
    """``out``, made if it does not exist and checked writable (``--out``)."""
    check_can_make(out, f"--out {out}", "pass another --out")  # first: it says why (a file there, /proc, ...)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {out}: cannot make the folder: {err.strerror or err}") from None
    return out


def cascade(run: Path, computed: Cascade | None = None) -> Cascade:
    """Compute (unless ``computed`` is given), write and print the cascade report of ``run``; return it."""
    computed = computed or cascade_report(run)
    write_report(computed, run)
    last, reciprocity = computed.last_step, computed.reciprocity
    print(f"influence measure: {computed.value}; whole-batch probes; step R = {last}")
    print("mean |influence| by hop distance (step R):  " + "  ".join(
        f"d={row['distance']}: {row['mean_abs']:.3g}" for row in _records(computed.decay) if row["step"] == last))
    print("source strength vs position (Spearman):      " + _correlations(computed.position))
    print(f"reciprocity over {reciprocity['pairs']} pairs: Pearson {_number(reciprocity['pearson'], '.3f')}, "
          f"asymmetry {_number(reciprocity['asymmetry'], '.3f')}")
    print(f"wrote {run / 'cascade.parquet'}, {run / 'pairwise.parquet'}, cascade_decay.png, pairwise_heatmap.png")
    return computed


def anomaly(run: Path, horizons: list[int] | None = None) -> list[dict]:
    """Compute, write and print the detection report of ``run`` (a run with ``--proximal`` and misbehaving
    participants); return its rows. ``horizons``: rounds before which scores count (default 5, 10, 20 and
    the whole run); the ROC curve uses the last."""
    computed = detection_report(run, horizons)
    png = write_report(computed, run)[-1]
    rows = _records(computed.table)
    print(f"{computed.misbehaving} misbehaving of {computed.participants}; scores higher = more anomalous; the "
          "anomaly table's columns (their meanings: the docs' Reference, or pyarrow.parquet.read_schema):")
    print(computed.table.apply(_cells).to_string(index=False))
    ranked = computed.suspects
    top = ranked.head(min(max(computed.misbehaving, 5), SHOWN))
    more = min(max(computed.misbehaving, 5), len(ranked)) - len(top)
    print("suspects, by mean cumulative proximal influence over the examiners that score them: " + ", ".join(
        f"{r.participant} ({r.score:.3g}{', misbehaving' if r.misbehaving else ''})" for r in top.itertuples())
        + (f", … (the next {more}: suspects.parquet)" if more > 0 else "")
        + (f"; ROC AUC of this ranking {computed.suspects_auc:.3f}" if computed.suspects_auc is not None else ""))
    print(f"wrote {run / 'anomaly.parquet'}, {run / 'suspects.parquet'} and {png.name}")
    return rows


def _options_label(options: str) -> str:
    """``{"factor": 5.0}`` -> ``(factor=5.0)``."""
    return "(" + ", ".join(f"{k}={json.dumps(v)}" for k, v in json.loads(options).items()) + ")"


def collaborators(runs: list[Path], out: Path | None = None) -> list[dict]:
    """Compare runs that differ in collaborator selection (and misbehaviour, seed): print mean final honest
    accuracy per setting over seeds and each rewiring's gain over the static topology seed by seed; write
    ``collaborators.parquet`` to ``out`` (default: the runs' common parent folder); return its rows."""
    computed = collaborators_report(runs)
    out = _out_folder(out or common_parent(runs))
    write_report(computed, out)
    rows = _records(computed.summary)
    kinds = Counter(kind for kind, _ in {(r["misbehavior"], r["misbehavior_options"]) for r in rows})
    varied = {kind for kind, settings in kinds.items() if settings > 1}  # run with several options: say which
    labels = ["none" if r["misbehavior"] == "none" else
              r["misbehavior"] + (_options_label(r["misbehavior_options"]) if r["misbehavior"] in varied else "")
              + f" x{r['misbehaving']}" for r in rows]
    width = max(16, *map(len, labels))
    print(f"{'misbehaviour':>{width}} {'rewiring':>9} {'seeds':>5} {'honest acc':>16} {'bad in-edges':>12} "
          f"{'gain vs static':>15} {'wins':>5}")
    for label, row in zip(labels, rows, strict=True):
        gain = f"{'-':>15}" if row["gain"] is None else f"{row['gain']:+15.4f}"
        wins = "-" if row["wins"] is None else f"{int(row['wins'])}/{row['paired']}"
        spread = f"{'-':>6}" if row["honest_acc_std"] is None else f"{row['honest_acc_std']:.4f}"
        print(f"{label:>{width}} {row['rewiring']:>9} {row['seeds']:>5} {row['honest_acc']:9.4f} ± "
              f"{spread} {row['anomalous_in_edges']:12.3f} {gain} {wins:>5}")
    print("honest acc: mean ± standard deviation over the seeds; gain vs static and wins: over the seeds that "
          "also have a static run")
    for run in computed.table.itertuples():
        if run.fallbacks:
            print(f"note: {run.run}: {run.fallbacks} rewiring(s) kept the previous W (the choices were not rooted; "
                  f"manifest.json: rewiring_fallbacks)")
    print(f"wrote {out / 'collaborators.parquet'}")
    return _records(computed.table)


def retrain(run: Path, loo: bool, shapley: int | None, local: bool = False, allow_imports: bool = False) -> None:
    """Compute the leave-one-out (``loo``) and Shapley (``shapley`` permutations) tables ``run`` lacks, now (Ray
    tasks, or here if ``local``); a run that did not finish training is refused first. The run's config imports the
    modules it names only with ``allow_imports`` (``config.rerun_config``)."""
    from dice_ray.api import Run

    Run(run).retrain(loo, shapley, local, allow_imports)


# A variant's part beyond first order at least this large against the first-order term (the alignment table's
# correction) is flagged: the expansion does not hold there.
CORRECTION_LIMIT = 0.5
SHOWN = 20  # participants a report prints by name at most (at either end of a ranking); its table has them all
RANKED_BY = {"loo": "leave-one-out effect", "shapley": "Shapley value"}  # a run without the ledger, ranked by


def contributions(run: Path, loo: bool = False, shapley: int | None = None, local: bool = False,
                  allow_imports: bool = False) -> Contributions:
    """Compute, write and print the contributions report of ``run``, retraining first with ``loo`` / ``shapley``
    (see ``retrain``); return it."""
    retrain(run, loo, shapley, local, allow_imports)
    computed = contributions_report(run)
    write_report(computed, run)
    rows, ranking, variants = computed.table, computed.ranking, computed.variants
    honest = ~rows["misbehaving"].to_numpy()
    shown = rows.drop(columns=[f"total{VARIANT_SUFFIX[v]}" for v in VARIANT_SUFFIX if v not in variants])
    if not computed.ledger:
        print(f"no ledger in this run: ranked by {RANKED_BY[ranking]}")
    shown = shown.sort_values("rank")
    if len(shown) > 2 * SHOWN:  # the first and last ranks; every row is in the table
        print(f"the {SHOWN} highest and {SHOWN} lowest ranks of {len(shown)} (all: contributions_report.parquet)")
        shown = pd.concat([shown.head(SHOWN), shown.tail(SHOWN)])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    measures = variants if computed.ledger else {ranking: computed.agreement}
    for v, agree in sorted(measures.items(), key=lambda item: item[0] != ranking):  # the ranking variant first
        label = (RANKED_BY[v] if not computed.ledger else "ledger total" if v == ranking else
                 f"  {v} ledger total")
        for name in ("loo", "shapley"):
            if agree[name]["spearman"] is not None:
                print(f"{label} vs {name}: Spearman {agree[name]['spearman']:.3f}, Kendall "
                      f"{agree[name]['kendall']:.3f} over {len(rows)} participants")
        scale = computed.scale.get("loo") if v == ranking else None
        if scale is not None:
            print(f"  ledger total / leave-one-out effect: median {scale['median']:.3g} over participants "
                  f"(quartiles {scale['low']:.3g} to {scale['high']:.3g}): other units, compare ranks (the ledger "
                  "counts a probed update at its source and where it first reaches each participant, leave-one-out "
                  "every update once in the final loss)")
        if agree["loo_honest"]["spearman"] is not None and rows["misbehaving"].any():
            print(f"  among the {int(honest.sum())} well-behaved participants only: Spearman "
                  f"{agree['loo_honest']['spearman']:.3f}, Kendall {agree['loo_honest']['kendall']:.3f}")
    label = "ledger total" if computed.ledger else RANKED_BY[ranking]
    print(f"{label} vs position and data (Spearman): " + _correlations(computed.position))
    if computed.misbehaving_flagged is not None:
        flagged = int(rows.loc[rows["misbehaving"], "harmful"].sum())
        print(f"misbehaving participants flagged harmful: {flagged} of {int(rows['misbehaving'].sum())}; honest "
              f"ones flagged: {int(rows.loc[~rows['misbehaving'], 'harmful'].sum())}")
    print(f"wrote {run / 'contributions_report.parquet'}, " + ", ".join(computed.figures()))
    return computed


def build_parser(prog: str = "python -m dice_ray.analyze") -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = OneLineParser(prog=prog, description=__doc__.split("\n\n")[1],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", choices=("alignment", "cascade", "anomaly", "collaborators", "contributions"),
                        help="which report")
    parser.add_argument("run", type=Path, nargs="+", help="run directory (collaborators and cascade: several)")
    parser.add_argument("--horizon", type=int, action="append", metavar="ROUNDS",
                        help="anomaly: count scores of rounds before ROUNDS (repeatable; default 5, 10, 20 and all)")
    parser.add_argument("--out", type=Path, help="collaborators: folder for collaborators.parquet; cascade of several "
                                                 "runs: for cascade_comparison.png (default: the runs' common parent)")
    parser.add_argument("--loo", action="store_true", help="contributions: retrain without each participant's "
                                                           "data now (Ray tasks) if the run has no loo.parquet")
    parser.add_argument("--shapley", type=int, metavar="K", help="contributions: Monte-Carlo Shapley with K "
                                                                 "permutations now (K (N−1) + 2 retraining runs)")
    parser.add_argument("--local", action="store_true", help="contributions: retrain in this process, not on Ray")
    parser.add_argument("--allow-imports", action="store_true",
                        help="contributions --loo/--shapley: import the modules the run's config names to retrain "
                        "it (refused without this flag; reading a run never imports them)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m dice_ray.analyze") -> int:
    """Command-line entry point; returns the exit status (2 for bad input)."""
    args = build_parser(prog).parse_args(argv)
    try:
        misplaced = [(option, owner) for option, owner, value in (
            ("--horizon", "anomaly", args.horizon), ("--out", "collaborators or cascade", args.out),
            ("--loo", "contributions", args.loo), ("--shapley", "contributions", args.shapley),
            ("--local", "contributions", args.local), ("--allow-imports", "contributions", args.allow_imports))
            if value not in (None, False) and args.report not in owner.split(" or ")]
        if misplaced:
            option, owner = misplaced[0]
            raise InputError(f"{option} is an option of the {owner} report, not of {args.report}")
        for run in args.run:
            if not run.is_dir():
                raise InputError(f"run directory {str(run)!r} {absent(run, 'folder')}")
        if args.report != "collaborators":  # the report's tables and figures go into the run directory
            for run in args.run:
                check_can_make(run, f"run directory {run}", "the report writes there: copy the run somewhere writable")
        if args.report == "collaborators":
            collaborators(args.run, args.out)
        elif args.report == "cascade":
            cascades(args.run, args.out)
        elif len(args.run) != 1:
            raise InputError(f"the {args.report} report reads one run directory, got {len(args.run)}")
        elif args.report == "anomaly":
            anomaly(args.run[0], args.horizon)
        elif args.report == "contributions":
            contributions(args.run[0], args.loo, args.shapley, args.local, args.allow_imports)
        else:
            alignment(args.run[0])
    except InputError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
