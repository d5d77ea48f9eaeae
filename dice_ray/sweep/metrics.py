"""Trial metrics: named groups of numbers computed from a finished run directory.

A metric group is a function ``(run_dir, config) -> {column: value}`` registered with
``register_metric(name, columns)``, where ``columns(config)`` lists the columns it returns for a run of that
config (none where it does not apply, e.g. alignment without influence). A sweep computes every group, or
those its ``metrics:`` list names; each column becomes a column of ``trials.parquet`` and can be the
``metric`` an Optuna search optimizes. Groups read only the run's tables and manifest, so a new one is one
decorated function (as ``proximal_detection`` below), in a module the sweep's ``base.imports`` lists: a trial
computes its metrics in a Ray worker, which imports those modules, not the script (``load_sweep`` refuses a group
the script registers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dice_ray.config import RunConfig
from dice_ray.reports.alignment import BEYOND_FIRST, alignment_rows
from dice_ray.rundir import MANIFEST, read_json

Values = dict[str, float | None]


@dataclass(frozen=True)
class TrialMetric:
    """A metric group: ``compute(run_dir, config)`` and the ``columns(config)`` it returns."""

    compute: Callable[[Path, RunConfig], Values]
    columns: Callable[[RunConfig], list[str]]


METRICS: dict[str, TrialMetric] = {}


def register_metric(name: str, columns: Callable[[RunConfig], list[str]]) -> Callable:
    """Decorator: register ``fn(run_dir, config) -> {column: value}`` as the metric group ``name``."""

    def register(fn: Callable[[Path, RunConfig], Values]) -> Callable[[Path, RunConfig], Values]:
        METRICS[name] = TrialMetric(fn, columns)
        return fn

    return register


def metric_columns(config: RunConfig, names: list[str] | None = None) -> list[str]:
    """Return the metric columns a trial of ``config`` reports (groups ``names``, default all)."""
    return [c for name in names or METRICS for c in METRICS[name].columns(config)]


def compute_metrics(run: Path, config: RunConfig, names: list[str] | None = None) -> Values:
    """Return every metric column of the finished run in ``run`` (groups ``names``, default all)."""
    values: Values = {}
    for name in names or METRICS:
        metric = METRICS[name]
        if metric.columns(config):
            values.update(metric.compute(run, config))
    return values


def _table(run: Path, name: str) -> dict[str, np.ndarray]:
    table = pq.read_table(run / f"{name}.parquet")
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


@register_metric("accuracy", lambda config: ["final_heldout_acc", "final_heldout_loss", "consensus_distance"])
def accuracy(run: Path, config: RunConfig) -> Values:
    """Mean held-out accuracy and loss over participants after the last round, and the consensus distance."""
    final = read_json(run / MANIFEST)["final"]
    return {"final_heldout_acc": _finite(final["heldout_acc_mean"]),
            "final_heldout_loss": _finite(final["heldout_loss_mean"]),
            "consensus_distance": _finite(final["consensus_distance"])}


STATISTICS = ("pearson", "spearman", "kendall", "relative_error")


def _statistics(config: RunConfig) -> dict[str, tuple[str, ...]]:
    """Variant -> the alignment statistics a trial reports for it: ``STATISTICS``, and ``correction`` (the part
    beyond first order, against the curvature term) for second-order and exact-readout when curvature is measured."""
    variants = config.influence.variants
    return {v: (*STATISTICS, "correction") if v in BEYOND_FIRST and "curvature" in variants else STATISTICS
            for v in variants}


def _alignment_columns(config: RunConfig) -> list[str]:
    inf = config.influence
    if not (inf.enabled and inf.ground_truth):
        return []
    return [f"{stat}_h{r}_{variant.replace('-', '_')}" for r in range(1, inf.hops + 1)
            for variant, stats in _statistics(config).items() for stat in stats]


@register_metric("alignment", _alignment_columns)
def alignment(run: Path, config: RunConfig) -> Values:
    """DICE-E against DICE-GT over the run's probes, per hop r and variant: Pearson, Spearman and Kendall
    correlation and relative error Σ|GT − E| / Σ|GT| of the cumulative DICE^{(r)} (the alignment report), and for
    second-order and exact-readout (with curvature measured) their ``correction``."""
    values: Values = {}
    statistics = _statistics(config)
    for row in alignment_rows(_table(run, "dice")):
        variant = row["variant"].replace("-", "_")
        if row["quantity"] == "cumulative" and row["variant"] in statistics:
            values.update({f"{stat}_h{row['hops']}_{variant}": _finite(row[stat])
                           for stat in statistics[row["variant"]]})
    return values


def _detection_columns(config: RunConfig) -> list[str]:
    inf = config.influence
    if not inf.enabled or config.misbehavior.kind == "none":
        return []
    return ["auc_dice_e"] + (["auc_dice_gt"] if inf.ground_truth else [])


@register_metric("detection", _detection_columns)
def detection(run: Path, config: RunConfig) -> Values:
    """ROC AUC of ranking probed participants by their mean DICE^{(R)} over whole-batch probes (positive:
    harmful) against the ``misbehaving`` ground truth: ``auc_dice_e`` with DICE-E (curvature variant if
    measured, else first-order), ``auc_dice_gt`` with DICE-GT. None when all probed sources are alike."""
    from sklearn.metrics import roc_auc_score

    dice, nodes = _table(run, "dice"), _table(run, "nodes")
    whole_batch = np.isnan(dice["sample_index"].astype(float))  # null sample_index: z is the whole minibatch
    final = (dice["hops"] == config.influence.hops) & whole_batch
    sources = dice["source"][final]
    probed = np.unique(sources)
    labels = nodes["misbehaving"][probed].astype(bool)
    estimate = "est_curvature" if "curvature" in config.influence.variants else "est_first_order"
    values: Values = {}
    for column, name in ((estimate, "auc_dice_e"), ("gt", "auc_dice_gt")):
        if name not in _detection_columns(config):
            continue
        influence = dice[column][final].astype(float)
        scores = np.array([influence[sources == j].mean() for j in probed])
        ok = labels.any() and not labels.all() and np.isfinite(scores).all()
        values[name] = float(roc_auc_score(labels, scores)) if ok else None
    return values


def _proximal_columns(config: RunConfig) -> list[str]:
    if not config.proximal.enabled or config.misbehavior.kind == "none":
        return []
    return ["auc_proximal", "auc_proximal_examiner_mean", "precision_proximal", "auc_proximal_mean",
            "rounds_to_auc_proximal"]


@register_metric("proximal_detection", _proximal_columns)
def proximal_detection(run: Path, config: RunConfig) -> Values:
    """The detection report (``dice_ray.reports.detection``) over the whole run, for the cumulative proximal score:
    ROC AUC over all (examiner, in-neighbour) pairs, its mean over examiners, precision at a_k (the examiner's
    number of anomalous in-neighbours), the AUC averaged over every scoring round, and the scoring rounds until it
    reaches 0.95 for good (null: never)."""
    import pandas as pd

    from dice_ray.reports.detection import detection_metrics, running_scores

    scores = running_scores(pd.read_parquet(run / "proximal.parquet"), pd.read_parquet(run / "rounds.parquet"),
                            config.proximal.window)
    row = next(r for r in detection_metrics(scores, config.rounds) if r["method"] == "proximal")
    return {"auc_proximal": _finite(row["auc"]), "auc_proximal_examiner_mean": _finite(row["auc_examiner_mean"]),
            "precision_proximal": _finite(row["precision"]), "auc_proximal_mean": _finite(row["auc_mean"]),
            "rounds_to_auc_proximal": _finite(row["rounds_to_auc"])}
