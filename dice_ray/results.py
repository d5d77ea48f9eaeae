"""Result tables: their schemas (column, type, meaning) in one place, and atomic writers.

Every table is a Parquet file in the run directory; each column carries its meaning as field metadata
(``pyarrow.parquet.read_schema(path).field(name).metadata[b"description"]``). A table is written under a
temporary name and renamed into place only when complete, so a file under its final name is always a
whole table: an interrupted run leaves no complete-looking ``rounds.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dice_ray.errors import InputError


def _schema(*columns: tuple[str, pa.DataType, str]) -> pa.Schema:
    return pa.schema([pa.field(name, kind, metadata={"description": doc}) for name, kind, doc in columns])


ROUNDS = _schema(
    ("round", pa.int32(), "round t (0-based); metrics after round t's gossip, i.e. of θ_k^{t+1}"),
    ("node", pa.int32(), "participant k (0..N-1)"),
    ("train_loss", pa.float32(), "L(θ_k^t; z_k^t): mean loss on k's minibatch of round t, before its local step "
                                 "(0 for a participant with no data, which takes no step)"),
    ("val_loss", pa.float32(), "mean loss of θ_k^{t+1} on k's own validation split (null between evaluations)"),
    ("val_acc", pa.float32(), "accuracy of θ_k^{t+1} on k's own validation split (null between evaluations)"),
    ("heldout_loss", pa.float32(), "mean loss of θ_k^{t+1} on the shared held-out batch z′ (null between "
                                   "evaluations)"),
    ("heldout_acc", pa.float32(), "accuracy of θ_k^{t+1} on z′ (null between evaluations)"),
    ("consensus_distance", pa.float64(), "network-level (1/N) Σ_k ||θ_k^{t+1} − θ̄^{t+1}||² over the trained "
                                         "parameters (not buffers or frozen ones), the same on every row of a round "
                                         "(null between evaluations)"),
)

NODES = _schema(
    ("node", pa.int32(), "participant k"),
    ("n_train", pa.int32(), "|D_k|: local training samples"),
    ("n_val", pa.int32(), "local validation samples"),
    ("q", pa.float64(), "participant weight q_k (Σ q_k = 1)"),
    ("in_degree", pa.int32(), "number of in-neighbours in W^0 (excluding k itself)"),
    ("self_weight", pa.float64(), "W^0_kk"),
    ("actor", pa.int32(), "index of the participant-group actor that hosted k (a resumed run's: in its last "
                          "session)"),
    ("misbehaving", pa.bool_(), "ground truth: k misbehaves as configured in misbehavior (concepts §5)"),
)

_PROBE = (
    ("round", pa.int32(), "probe round t"),
    ("source", pa.int32(), "probed participant j"),
    ("probe_id", pa.int32(), "probe number within the run"),
    ("sample_index", pa.int32(), "position of the removed sample in j's minibatch; null: z is the whole minibatch"),
)

INFLUENCE = _schema(
    *_PROBE,
    ("target", pa.int32(), "participant k whose loss on z′ is measured"),
    ("step", pa.int32(), "s: rounds after the probe (k's state θ_k^{t+s}); 0 is the direct term at θ_j^{t+½}"),
    ("distance", pa.int32(), "the step s at which j's round-t update first reaches k, k ∈ N^(s) (0 for j itself; "
                             "the hop distance from j to k in a static graph, not in W^t alone in a time-varying "
                             "one)"),
    ("gt", pa.float64(), "DICE-GT term d_k^{(s)} = L(θ_k^{t+s}; z′) − L(θ_{k∖z}^{t+s}; z′) by counterfactual replay "
                         "(s = 0: d_j^{(½)}); negative: z lowered k's loss"),
    ("est_first_order", pa.float64(), "DICE-E term e_k^{(s)}, communication only (J = I)"),
    ("est_curvature", pa.float64(), "DICE-E term e_k^{(s)} with the local steps' Jacobians (Hessian-vector products)"),
    ("est_second_order", pa.float64(), "DICE-E term exact to second order in Δ: ∇Lᵀ(a + b) − ½ aᵀH′a (b: the O(Δ²) "
                                       "perturbation, H′: Hessian of the z′ loss); null unless that variant is on"),
    ("est_exact_readout", pa.float64(), "DICE-E term read by the z′ loss itself: L(θ_k; z′) − L(θ_k − δ_k; z′), δ the "
                                        "curvature perturbation (a + b with exact_readout_b); equals gt at s = 1; "
                                        "null unless that variant is on"),
)

DICE = _schema(
    *_PROBE,
    ("hops", pa.int32(), "r: the cascade up to r hops"),
    ("gt", pa.float64(), "DICE-GT^{(r)} = q_j d_j^{(½)} + Σ_{s≤r} Σ_{k∈N^{(s)}(j)} q_k d_k^{(s)}"),
    ("est_first_order", pa.float64(), "DICE-E^{(r)}, first-order variant"),
    ("est_curvature", pa.float64(), "DICE-E^{(r)}, curvature variant"),
    ("est_second_order", pa.float64(), "DICE-E^{(r)}, second-order variant (null unless that variant is on)"),
    ("est_exact_readout", pa.float64(), "DICE-E^{(r)}, exact-readout variant (null unless that variant is on)"),
    ("gt_hop", pa.float64(), "hop r alone: Σ_{k∈N^{(r)}(j)} q_k d_k^{(r)} (DICE-GT^{(r)} − DICE-GT^{(r−1)})"),
    ("est_first_order_hop", pa.float64(), "hop r alone, DICE-E first-order"),
    ("est_curvature_hop", pa.float64(), "hop r alone, DICE-E curvature"),
    ("est_second_order_hop", pa.float64(), "hop r alone, DICE-E second-order"),
    ("est_exact_readout_hop", pa.float64(), "hop r alone, DICE-E exact-readout"),
    ("gt_horizon", pa.float64(), "horizon total Σ_k q_k d_k^{(r)}: z's effect on the network's weighted loss r "
                                 "rounds later"),
    ("est_first_order_horizon", pa.float64(), "Σ_k q_k e_k^{(r)}, first-order variant"),
    ("est_curvature_horizon", pa.float64(), "Σ_k q_k e_k^{(r)}, curvature variant"),
    ("est_second_order_horizon", pa.float64(), "Σ_k q_k e_k^{(r)}, second-order variant"),
    ("est_exact_readout_horizon", pa.float64(), "Σ_k q_k e_k^{(r)}, exact-readout variant"),
)

ALIGNMENT = _schema(
    ("hops", pa.int32(), "r"),
    ("quantity", pa.string(), "'hop': the hop-r term alone; 'cumulative': DICE^{(r)}; 'terms': every d_k^{(r)}, "
                              "k within r hops of the source (itself included), against e_k^{(r)}"),
    ("variant", pa.string(), "DICE-E variant: first-order, curvature, second-order or exact-readout"),
    ("probes", pa.int32(), "number of values compared (probes; for 'terms', probe × participant pairs)"),
    ("pearson", pa.float64(), "Pearson correlation of DICE-E with DICE-GT over the probes"),
    ("spearman", pa.float64(), "Spearman rank correlation"),
    ("kendall", pa.float64(), "Kendall's tau"),
    ("relative_error", pa.float64(), "Σ|GT − E| / Σ|GT| over the probes"),
    ("correction", pa.float64(), "second-order and exact-readout: Σ|E − E_curvature| / Σ|E_curvature| over the probes, "
                                 "their part beyond the curvature term's first order, which needs no ground truth; "
                                 "near 1 or above, the expansion does not hold there (null for the other variants)"),
)

CASCADE = _schema(
    ("step", pa.int32(), "s: rounds after the probe"),
    ("distance", pa.int32(), "the step at which the probed participant j's update first reaches the target k "
                             "(the hop distance in a static graph; influence.parquet's distance)"),
    ("value", pa.string(), "which influence: gt, est_second_order, est_exact_readout, est_curvature or "
                           "est_first_order"),
    ("mean_abs", pa.float64(), "mean |influence term| over whole-batch probes and targets at this distance"),
    ("terms", pa.int32(), "number of terms averaged"),
)

PAIRWISE = _schema(
    ("source", pa.int32(), "j"),
    ("target", pa.int32(), "k"),
    ("value", pa.string(), "which influence: gt, est_second_order, est_exact_readout, est_curvature or "
                           "est_first_order"),
    ("influence", pa.float64(), "I_{j→k}: mean over whole-batch probes of j of the term d_k^{(R)} (or e_k^{(R)}) "
                                "R = the run's hops; negative: j's data lowered k's loss"),
)

PROXIMAL = _schema(
    ("round", pa.int32(), "scoring round t"),
    ("examiner", pa.int32(), "examiner k, scoring on its own z′_k"),
    ("neighbor", pa.int32(), "in-neighbour l of k in W^t (l ≠ k)"),
    ("weight", pa.float64(), "W^t_kl"),
    ("score", pa.float64(), "proximal influence p_{k←l}^t = q_k W^t_kl ∇L(θ_k^{t+1}; z′_k)ᵀ Δ_l^t (proximal.readout "
                            "exact: q_k [L(θ_k^{t+1}; z′_k) − L(θ_k^{t+1} − W^t_kl Δ_l^t; z′_k)]); positive: l's "
                            "update raised k's loss (harmful)"),
    ("cumulative_score", pa.float64(), "Σ of score over the scoring rounds ≤ t in which l was k's in-neighbour"),
    ("window_score", pa.float64(), "Σ of score over the last proximal.window scoring rounds (≤ t)"),
    ("update_cosine", pa.float64(), "baseline: cos(Δ_k^t, Δ_l^t), the two participants' updates (0 if one is zero)"),
    ("neighbor_is_anomalous", pa.bool_(), "ground truth: l misbehaves (nodes.parquet misbehaving)"),
)

REWIRING = _schema(
    ("round", pa.int32(), "the new in-neighbours are used from round t on"),
    ("participant", pa.int32(), "participant k choosing its in-neighbours"),
    ("neighbor", pa.int32(), "candidate l"),
    ("action", pa.string(), "kept (was and stays an in-neighbour), added (new), dropped (was one, is not any more)"),
    ("cumulative_score", pa.float64(), "cumulative proximal influence of l on k before round t (null: never scored: "
                                       "k has not heard l, or k has no validation data to score on)"),
)

ANOMALY = _schema(
    ("method", pa.string(), "detector: proximal (cumulative score), proximal-window (windowed score), train-loss "
                            "(the neighbour's mean training loss), cosine (mean 1 − cos(Δ_k, Δ_l))"),
    ("horizon", pa.int32(), "scores use the scoring rounds t < horizon"),
    ("auc", pa.float64(), "ROC AUC over all (examiner, in-neighbour) pairs: anomalous neighbours against honest ones"),
    ("auc_mean", pa.float64(), "mean of the overall ROC AUC after each scoring round before horizon (the area "
                               "under the AUC-over-time curve, per round): how well a detector does early as well "
                               "as late"),
    ("rounds_to_auc", pa.int32(), "scoring rounds until the overall ROC AUC reaches 0.95 and stays at or above it "
                                  "up to horizon (null: not reached)"),
    ("auc_examiner_mean", pa.float64(), "mean of the per-examiner ROC AUC (examiners with anomalous and honest "
                                        "in-neighbours)"),
    ("auc_examiner_min", pa.float64(), "smallest per-examiner ROC AUC"),
    ("examiners", pa.int32(), "examiners with anomalous and honest in-neighbours"),
    ("precision", pa.float64(), "mean over examiners with anomalous and honest in-neighbours of precision at a_k "
                                "(a_k = its number of anomalous in-neighbours; scores tied at the a_k-th place count "
                                "as in a random order of them, in expectation)"),
    ("detected", pa.float64(), "share of those examiners whose anomalous in-neighbours all rank worst at the last "
                               "scoring round before the horizon and from some round on"),
    ("delay_median", pa.float64(), "median detection delay over detected examiners: scoring rounds until every "
                                   "anomalous in-neighbour ranks among the worst a_k and stays there"),
    ("delay_max", pa.float64(), "largest detection delay over detected examiners"),
)

SUSPECTS = _schema(
    ("participant", pa.int32(), "participant l, scored by at least one examiner (an in-neighbour of someone)"),
    ("score", pa.float64(), "mean over the examiners k that score l of l's cumulative proximal influence Σ_t "
                            "p_{k←l}^t over the whole run: how much l's updates raised its neighbours' losses"),
    ("examiners", pa.int32(), "examiners that scored l"),
    ("rank", pa.int32(), "1 = the highest score, the most suspect"),
    ("misbehaving", pa.bool_(), "whether l misbehaved (the run's ground truth, for checking the ranking)"),
)

COLLABORATORS = _schema(
    ("run", pa.string(), "run directory"),
    ("rewiring", pa.string(), "collaborator selection: none (static topology), influence, outlier or random"),
    ("misbehavior", pa.string(), "misbehaviour kind"),
    ("misbehavior_options", pa.string(), "the kind's options as JSON, by their config names (a built-in kind's "
                                        "fields of its section, such as flip_fraction; a kind of your own's "
                                        "misbehavior.options)"),
    ("misbehaving", pa.int32(), "number of misbehaving participants"),
    ("seed", pa.int64(), "the run's seed"),
    ("honest_acc", pa.float64(), "final mean held-out accuracy of the honest participants"),
    ("honest_loss", pa.float64(), "final mean held-out loss of the honest participants"),
    ("anomalous_in_edges", pa.float64(), "share of honest participants' in-edges from misbehaving ones, at the end"),
    ("fallbacks", pa.int32(), "rewirings whose choices were not rooted, so W stayed as it was (manifest.json: "
                              "rewiring_fallbacks)"),
)

# The contribution ledger's column suffix of each DICE-E variant (``influence_curvature``, ``total_second_order``, …).
VARIANT_SUFFIX = {"first-order": "", "curvature": "_curvature", "second-order": "_second_order",
                  "exact-readout": "_exact_readout"}

CONTRIBUTIONS = _schema(
    ("round", pa.int32(), "round u in which the term was measured (gradient at θ_k^u, the start of round u)"),
    ("probe_round", pa.int32(), "ledger round t whose update Δ_j^t the term is about (t = u − step)"),
    ("step", pa.int32(), "s: 0 for the self term q_j ∇L(θ_j^t; z′)ᵀΔ_j^t, else the hop s ≤ R at which k is first "
                         "reached from j"),
    ("source", pa.int32(), "participant j whose update is accounted"),
    ("target", pa.int32(), "participant k whose loss on z′ it changed (j itself for step 0)"),
    ("influence", pa.float64(), "first-order DICE-E term q_k (W^{t+s−1}⋯W^t)_{kj} ∇L(θ_k^{t+s}; z′)ᵀ Δ_j^t; "
                                "negative: j's update lowered k's loss (null unless ledger.variants has first-order)"),
    ("cumulative", pa.float64(), "L[j→k]: Σ of influence over this pair's terms measured in rounds ≤ u"),
    ("influence_curvature", pa.float64(), "curvature DICE-E term q_k ∇L(θ_k^{t+s}; z′)ᵀ δ_k^{(s)}, δ propagated "
                                          "through the local steps' Jacobians (null unless ledger.variants has "
                                          "curvature)"),
    ("cumulative_curvature", pa.float64(), "L[j→k] of the curvature terms, rounds ≤ u"),
    ("influence_second_order", pa.float64(), "second-order DICE-E term q_k (∇Lᵀ(a + b) − ½ aᵀH′a; the self term "
                                             "∇ᵀΔ + ½ ΔᵀH′Δ) (null unless ledger.variants has second-order)"),
    ("cumulative_second_order", pa.float64(), "L[j→k] of the second-order terms, rounds ≤ u"),
    ("influence_exact_readout", pa.float64(), "exact-readout DICE-E term q_k (L(θ_k; z′) − L(θ_k − δ_k; z′); the self "
                                              "term L(θ_j^t + Δ; z′) − L(θ_j^t; z′)) (null unless ledger.variants "
                                              "has exact-readout)"),
    ("cumulative_exact_readout", pa.float64(), "L[j→k] of the exact-readout terms, rounds ≤ u"),
)

SHARES = _schema(
    ("participant", pa.int32(), "participant j"),
    ("total", pa.float64(), "T_j = Σ_k L[j→k] (first-order) at the end of the run; negative: j lowered the "
                            "weighted loss (null unless ledger.variants has first-order)"),
    ("share", pa.float64(), "max(−T_j, 0) / Σ_l max(−T_l, 0): j's part of the budget of helpful participants, "
                            "T_j of the ranking variant (ledger.rank_by, default the first of ledger.variants); "
                            "NaN where T_j is, which then ranks last"),
    ("harmful", pa.bool_(), "T_j > 0 (ranking variant): j's updates raised the network's weighted loss"),
    ("rank", pa.int32(), "1 = most helpful (most negative T_j of the ranking variant)"),
    ("total_curvature", pa.float64(), "T_j of the curvature ledger (null unless computed)"),
    ("total_second_order", pa.float64(), "T_j of the second-order ledger (null unless computed)"),
    ("total_exact_readout", pa.float64(), "T_j of the exact-readout ledger (null unless computed)"),
)

LOO = _schema(
    ("participant", pa.int32(), "participant j left out (its training data; it still gossips), or −1: the full run"),
    ("target", pa.int32(), "participant k"),
    ("final_loss", pa.float64(), "L(θ_k^T; z′) after the run without j's data (the ledger's z′)"),
    ("effect", pa.float64(), "q_k (L_k(full) − L_k(without j)); Σ over k is j's leave-one-out effect; negative: "
                             "j's data lowered k's final loss"),
)

SHAPLEY = _schema(
    ("participant", pa.int32(), "participant j"),
    ("shapley", pa.float64(), "Monte-Carlo Shapley value of j for v(S) = Σ_k q_k L(θ_k^T; z′) training with only "
                              "S's data (sign as the ledger: negative = j lowered the loss)"),
    ("stderr", pa.float64(), "standard error over the permutations"),
    ("permutations", pa.int32(), "permutations sampled"),
)

CONTRIBUTION_REPORT = _schema(
    ("participant", pa.int32(), "participant j"),
    ("total", pa.float64(), "ledger total T_j, first-order (null unless computed)"),
    ("share", pa.float64(), "share of the helpful budget, by the ranking variant's totals (ledger.rank_by; a run "
                            "without the ledger: by its leave-one-out effects, else its Shapley values)"),
    ("harmful", pa.bool_(), "flagged harmful (the ranking measure > 0: it raised the weighted loss)"),
    ("rank", pa.int32(), "rank by the ranking measure, 1 = most helpful"),
    ("loo_effect", pa.float64(), "leave-one-participant-out effect Σ_k q_k (L_k(full) − L_k(without j)) (null: "
                                 "not computed)"),
    ("shapley", pa.float64(), "Monte-Carlo Shapley value (null: not computed)"),
    ("n_train", pa.int32(), "|D_j|: training samples"),
    ("misbehaving", pa.bool_(), "j misbehaves (e.g. flips labels)"),
    ("in_degree", pa.int32(), "in-neighbours of j in W^0"),
    ("betweenness", pa.float64(), "betweenness centrality of j in the communication graph (networkx)"),
    ("total_curvature", pa.float64(), "ledger total T_j, curvature variant (null unless computed)"),
    ("total_second_order", pa.float64(), "ledger total T_j, second-order variant (null unless computed)"),
    ("total_exact_readout", pa.float64(), "ledger total T_j, exact-readout variant (null unless computed)"),
)

# The fixed columns of a sweep's trials.parquet; the swept config fields and the trial metrics follow them
# (dice_ray/sweep/records.py adds those, as they depend on the sweep).
TRIALS = _schema(
    ("trial_id", pa.string(), "trial id: grid index and parameter hash (search grid) or Ray Tune's trial id "
                              "(search optuna)"),
    ("status", pa.string(), "ok, or failed: the trial raised (bad input, diverged training, a lost actor)"),
    ("error", pa.string(), "why a failed trial failed (exception type and message); null when ok"),
    ("run_dir", pa.string(), "the trial's run directory (simulate's tables), relative to the sweep directory"),
    ("start_time", pa.string(), "when the trial started (UTC, ISO 8601; for a trial whose process died, when "
                                "its failure was recorded)"),
    ("wall_seconds", pa.float64(), "trial wall time: simulation, influence measurement and metrics (null when "
                                  "the trial's process died; a trial that finished unrecorded before a resume: its "
                                  "run's recorded wall time; one continued from a checkpoint: from the resume on)"),
)

TABLES: dict[str, pa.Schema] = {"rounds": ROUNDS, "nodes": NODES, "influence": INFLUENCE, "dice": DICE,
                                "alignment": ALIGNMENT, "cascade": CASCADE, "pairwise": PAIRWISE,
                                "proximal": PROXIMAL, "rewiring": REWIRING, "anomaly": ANOMALY, "suspects": SUSPECTS,
                                "collaborators": COLLABORATORS, "contributions": CONTRIBUTIONS, "shares": SHARES,
                                "loo": LOO, "shapley": SHAPLEY, "contributions_report": CONTRIBUTION_REPORT,
                                "trials": TRIALS}


def describe_tables() -> str:
    """Return a Markdown description of every table's columns, a section per table (the docs' Result tables)."""
    lines = []
    for table, schema in TABLES.items():
        lines += [f"## `{table}.parquet`", "", "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{f.name}` | {f.type} | {f.metadata[b'description'].decode().replace('|', chr(92) + '|')} |"
                  for f in schema]
        lines.append("")
    return "\n".join(lines)


def _atomic_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    os.replace(tmp, path)


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Have ``write(tmp)`` write a whole file, published as ``path`` atomically (a temporary file beside it, fsync,
    rename): a reader never sees half of it, and a crash leaves the previous file or none."""
    path = Path(path)
    tmp = _atomic_path(path)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException:  # a full disk or an interrupt: no partial file stays behind
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (temporary file, fsync, rename)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_table_atomic(path: str | Path, columns: Mapping[str, Any] | list[Mapping[str, Any]],
                       schema: pa.Schema) -> None:
    """Write a whole table (column name -> values, or a list of row dicts) with ``schema`` to ``path``
    atomically."""
    path = Path(path)
    if isinstance(columns, list):
        columns = {f.name: [row.get(f.name) for row in columns] for f in schema}
    table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


class TableWriter:
    """Streams row groups of one table into a hidden ``.<name>.*.partial`` beside it; ``close()`` renames it into place.

    Until ``close()`` the final path does not exist, and the partial file lacks Parquet's footer, so a
    killed run never leaves a table that reads as complete. Use as a context manager: on an exception
    the partial file is removed.
    """

    def __init__(self, path: str | Path, schema: pa.Schema):
        self.path = Path(path)
        self.schema = schema
        self._tmp = _atomic_path(self.path)
        self._writer = pq.ParquetWriter(self._tmp, schema)

    def write(self, columns: Mapping[str, Any]) -> None:
        """Append rows given as column name -> array-like (every schema column, equal lengths)."""
        arrays = [pa.array(columns[f.name], type=f.type) for f in self.schema]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def write_table(self, table: pa.Table) -> None:
        """Append the rows of ``table``, an Arrow table of this schema (no trip through Python objects: joining a
        run's parts that way took 2.1 s for 4.2 million rows, 0.6 s this way)."""
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))

    def close(self) -> None:
        """Finish the file and rename it to its final path."""
        self._writer.close()
        _publish(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


TOPOLOGY_FILE = "topology_file"  # a run's copy of its topology file (topology "file"): this name, the file's suffix


def keep_topology_file(config: Any, out: Path) -> dict[str, str] | None:
    """Copy the file of a "file" topology into the run directory ``out`` (atomically): a resume, a retraining and
    the reports read the graph the run trained on from the run itself, from any folder and on any machine the
    directory is copied to. Return the manifest's record of it, ``topology_file`` (name and SHA-256); None: no
    file."""
    if config.topology.name != "file":
        return None
    source = Path(config.topology.file)
    name = TOPOLOGY_FILE + source.suffix.lower()  # the suffix says the format (a W matrix or an edge list)
    data = source.read_bytes()
    write_atomic(out / name, lambda tmp: tmp.write_bytes(data))
    return {"name": name, "sha256": hashlib.sha256(data).hexdigest()}


def kept_topology_file(run: Path, manifest: Mapping[str, Any]) -> Path | None:
    """The run's copy of its topology file (``keep_topology_file``) as its manifest records it; None: the run kept
    none (not a "file" topology, or a run of an earlier version, which reads the path its config names). A copy
    removed or changed since the run, or a record naming another file, is an ``InputError``."""
    kept = manifest.get("topology_file")
    if kept is None:
        return None
    name = kept.get("name") if isinstance(kept, dict) else None
    if not isinstance(name, str) or Path(name).name != name or not name.startswith(TOPOLOGY_FILE):
        raise InputError(f"{run}: manifest.json's topology_file names no copy in the run directory")
    path = run / name
    if not path.is_file():
        raise InputError(f"{run}: the run's copy of its topology file, {name}, is missing")
    if hashlib.sha256(path.read_bytes()).hexdigest() != kept.get("sha256"):
        raise InputError(f"{run}: the run's copy of its topology file, {name}, was changed since the run")
    return path
