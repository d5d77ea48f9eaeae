"""Contribution accounting (issue 7): the online ledger is the sum of the influence tables' first-order DICE-E,
the same for any placement and after a lost actor; leave-one-out and Shapley retraining are exact where they
can be."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dice_ray.cli.simulate import build_parser, resolve_config
from dice_ray.cli.simulate import main as simulate
from dice_ray.core.topology import make_topology
from dice_ray.experiment import prepare
from dice_ray.methods.contributions import PathWeights, shares
from dice_ray.methods.dice.trajectory import first_reached, reach
from dice_ray.methods.retraining import final_losses, shapley_coalitions, shapley_values

BASE = ["--no-progress", "--dataset", "digits", "--nodes", "8", "--batch-size", "8", "--seed", "5",
        "--heldout-size", "64"]


def _run(out: Path, *flags: str) -> Path:
    assert simulate([*BASE, "--out", str(out), *flags]) == 0
    return out


def test_path_weights_are_first_reached_products() -> None:
    topology = make_topology("exponential", 8, weights="metropolis")
    paths = PathWeights(topology.mixing_matrix, 8, static=True)
    w = topology.mixing_matrix(0).toarray()
    for s in (1, 2, 3):
        f = paths.first_reached(0, s).toarray()
        product = np.linalg.matrix_power(w, s)
        for j in range(8):
            new = first_reached(reach([topology.mixing_matrix(0)] * s, j))[s]
            assert sorted(np.flatnonzero(f[:, j]).tolist()) == sorted(new.tolist())
            np.testing.assert_allclose(f[new, j], product[new, j], rtol=1e-12)


def test_share_rule() -> None:
    rows = shares(np.array([-3.0, 1.0, -1.0, 0.0]))
    np.testing.assert_allclose(rows["share"], [0.75, 0.0, 0.25, 0.0])
    assert rows["harmful"].tolist() == [False, True, False, False]
    assert rows["rank"].tolist() == [1, 4, 2, 3]
    # a total that is not a number has no share and ranks last; it used to zero every share
    rows = shares(np.array([-3.0, 1.0, -1.0, np.nan]))
    np.testing.assert_allclose(rows["share"], [0.75, 0.0, 0.25, np.nan])
    assert rows["rank"].tolist() == [1, 3, 2, 4] and rows["harmful"].tolist() == [False, True, False, False]


def test_ledger_equals_sum_of_per_probe_first_order_dice(tmp_path: Path) -> None:
    """Every probe of rounds 0..T−1−R, all sources: Σ of the ledger's terms of probe (j, t) equals dice.parquet's
    est_first_order at hops R; rounds after that are truncated, not dropped."""
    out = _run(tmp_path / "run", "--engine", "local", "--rounds", "9", "--topology", "ring", "--misbehavior",
               "scale", "--misbehaving-selection", "ids", "--misbehaving-ids", "2", "--ledger", "--ledger-hops", "3",
               "--ledger-every", "2",
               "--influence", "--hops", "3", "--probe-rounds", "0,2,4", "--set", "influence.variants=[first-order]",
               "--set", "influence.ground_truth=false")
    ledger = pd.read_parquet(out / "contributions.parquet")
    dice = pd.read_parquet(out / "dice.parquet").query("hops == 3").set_index(["round", "source"])
    ours = ledger[ledger["probe_round"] <= 4].groupby(["probe_round", "source"])["influence"].sum()
    ours.index.names = ["round", "source"]
    theirs = dice["est_first_order"]
    assert len(ours) == len(theirs) == 3 * 8
    np.testing.assert_allclose(ours.loc[theirs.index], theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max())
    assert sorted(set(ledger["probe_round"])) == [0, 2, 4, 6, 8]
    assert ledger.query("probe_round == 6")["step"].max() == 2  # measured at rounds 6..8 only
    last = ledger.groupby(["source", "target"])["cumulative"].last()
    np.testing.assert_allclose(last, ledger.groupby(["source", "target"])["influence"].sum(), rtol=1e-12)
    table = pd.read_parquet(out / "shares.parquet")
    np.testing.assert_allclose(table["total"], ledger.groupby("source")["influence"].sum(), rtol=1e-12)


def test_same_ledger_for_one_and_two_actors_and_local(ray_local, tmp_path: Path) -> None:
    flags = ["--rounds", "7", "--topology", "exponential", "--ledger", "--ledger-hops", "2", "--ledger-every", "2",
             "--proximal"]
    one = pd.read_parquet(_run(tmp_path / "one", "--actors", "1", *flags) / "contributions.parquet")
    two = pd.read_parquet(_run(tmp_path / "two", "--actors", "2", *flags) / "contributions.parquet")
    local = pd.read_parquet(_run(tmp_path / "local", "--engine", "local", *flags) / "contributions.parquet")
    keys = ["round", "probe_round", "step", "source", "target"]
    assert len(one) > 8 * 8
    pd.testing.assert_frame_equal(one, local)  # the same block code on the same rows: bitwise
    # Two blocks of 4 train with float32 vmaps of another width: the runs themselves differ in the last bits
    # (rounds.parquet too), and the ledger follows them to float32 precision.
    pd.testing.assert_frame_equal(one[keys], two[keys])
    for column in ("influence", "cumulative"):
        scale = one[column].abs().max()
        np.testing.assert_allclose(one[column], two[column], rtol=1e-5, atol=1e-6 * scale, err_msg=column)


def test_groups_read_only_the_gradient_blocks_their_terms_need(ray_local, tmp_path: Path) -> None:
    """Ring of 8 in 4 groups of 2, R = 1: each group reads its two neighbouring groups' gradient blocks, not all
    three others, and the ledger is the one-actor ledger."""
    from dice_ray.experiment import prepare
    from dice_ray.methods.contributions import LedgerRouter

    flags = ["--rounds", "5", "--topology", "ring", "--ledger", "--ledger-hops", "1"]
    one = pd.read_parquet(_run(tmp_path / "one", "--actors", "1", *flags) / "contributions.parquet")
    four = pd.read_parquet(_run(tmp_path / "four", "--actors", "4", *flags) / "contributions.parquet")
    keys = ["round", "probe_round", "step", "source", "target"]
    pd.testing.assert_frame_equal(one[keys], four[keys])
    for column in ("influence", "cumulative"):
        np.testing.assert_allclose(one[column], four[column], rtol=1e-5, atol=1e-6 * one[column].abs().max())
    config = resolve_config(build_parser().parse_args([*BASE, *flags, "--actors", "4"]))
    experiment = prepare(config)
    blocks = [np.arange(2 * g, 2 * g + 2) for g in range(4)]
    router = LedgerRouter(config, experiment.topology, blocks, experiment.topology.mixing_matrix)
    route = router.routes(3)[1]
    assert route.sources == [0, 1, 2] and np.concatenate([blocks[s] for s in route.sources]).tolist() == list(range(6))


def test_leaving_out_a_participant_without_data_changes_nothing(tmp_path: Path) -> None:
    out = _run(tmp_path / "loo", "--engine", "local", "--rounds", "6", "--topology", "ring", "--shrink-ids", "3,5",
               "--shrink-fraction", "1.0", "--ledger", "--ledger-hops", "2", "--loo")
    loo = pd.read_parquet(out / "loo.parquet")
    effect = loo[loo["participant"] >= 0].groupby("participant")["effect"].sum()
    assert effect[3] == 0.0 and effect[5] == 0.0  # bitwise: the same run twice
    assert (effect.drop([3, 5]) != 0).all()
    ledger = pd.read_parquet(out / "contributions.parquet")
    assert (ledger.loc[ledger["source"].isin([3, 5]), "influence"] == 0).all()  # no data, no update
    nodes = pd.read_parquet(out / "nodes.parquet")
    assert nodes.loc[[3, 5], "n_train"].tolist() == [0, 0]


def test_shapley_of_an_additive_game_is_each_players_part() -> None:
    parts = np.array([0.5, -1.0, 2.0, 0.25])
    orders = shapley_coalitions(4, 5, seed=1)
    value = {frozenset(c): float(parts[list(c)].sum()) for c in _subsets(4)}
    rows = shapley_values(orders, value)
    np.testing.assert_allclose(rows["shapley"], parts, rtol=1e-12)
    np.testing.assert_allclose(rows["stderr"], 0, atol=1e-12)


def _subsets(n: int) -> list[tuple[int, ...]]:
    from itertools import combinations

    return [c for r in range(n + 1) for c in combinations(range(n), r)]


def test_shapley_values_add_up_to_the_grand_coalition(tmp_path: Path) -> None:
    """Efficiency: in every permutation the marginals sum to v(everyone) − v(nobody)."""
    flags = ["--nodes", "4", "--rounds", "3", "--topology", "ring"]
    out = _run(tmp_path / "shap", "--engine", "local", *flags, "--shapley", "2", "--loo")
    shapley = pd.read_parquet(out / "shapley.parquet")
    loo = pd.read_parquet(out / "loo.parquet")
    experiment = prepare(resolve_config(build_parser().parse_args([*BASE, *flags])))
    nobody = experiment.q @ final_losses(experiment, [0, 1, 2, 3])
    everyone = experiment.q @ loo.loc[loo["participant"] == -1, "final_loss"].to_numpy()
    assert len(shapley) == 4 and (shapley["permutations"] == 2).all()
    np.testing.assert_allclose(shapley["shapley"].sum(), everyone - nobody, rtol=1e-9)
    assert everyone < nobody  # training on everyone's data lowers the loss
    from dice_ray.methods.retraining import retraining_changes

    assert retraining_changes(out, True, 2) == {}  # both tables there, with 2 permutations
    assert retraining_changes(out, False, 3) == {"ledger.loo": False, "ledger.shapley_permutations": 3}  # only Shapley
    assert retraining_changes(out, True, 3) == {"ledger.loo": False, "ledger.shapley_permutations": 3}  # loo is there


@pytest.mark.parametrize(("flags", "message"), [
    (["--ledger", "--ledger-every", "0"], "ledger.every"),
    (["--ledger", "--ledger-hops", "0"], "ledger.hops"),
    (["--ledger", "--rewire", "random", "--proximal"], "contribution ledger"),
    (["--ledger", "--ledger-zprime", "validation", "--val-fraction", "0"], "ledger.zprime"),
    (["--shrink-ids", "99"], "data.shrink"),
    (["--shrink-fraction", "2"], "data.shrink.fraction"),
    (["--ledger", "--ledger-zprime", "test"], "ledger.zprime"),
    (["--ledger", "--ledger-variants", "hessian"], "ledger.variants"),
    (["--ledger", "--ledger-variants", "curvature,curvature"], "ledger.variants"),
    (["--ledger", "--ledger-variants", ","], "ledger.variants"),
    (["--ledger", "--ledger-variants", "curvature", "--set", "ledger.rank_by=first-order"], "ledger.rank_by"),
])
def test_bad_ledger_config_exits_2(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    assert simulate([*BASE, "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "x").exists()


def test_recovery_restores_the_ledger_and_its_kept_updates(ray_local, tmp_path: Path) -> None:
    """A group killed at round 12 is restored from the checkpoint after round 9: the driver's L[j→k] and the
    groups' kept updates Δ of the ledger rounds 8 and 9 (still owed hop terms) come back with it."""
    from dice_ray.config import build_config
    from dice_ray.runner import simulate as run

    def config(out: Path):
        return build_config({"nodes": 8, "rounds": 20, "seed": 5, "topology": {"name": "exponential"},
                             "data": {"dataset": "digits", "heldout_size": 64}, "optim": {"batch_size": 8},
                             "engine": {"actors": 2}, "ledger": {"enabled": True, "hops": 3},
                             "output": {"out": str(out), "progress": False, "checkpoint_every": 5}})

    def kill_group_at(round_: int, group: int):
        def on_round(metrics, engine) -> None:
            import ray

            if metrics.round == round_ and engine.epoch == 1:
                ray.kill(engine.groups[group], no_restart=False)
        return on_round

    undisturbed = run(config(tmp_path / "a"))
    disturbed = run(config(tmp_path / "b"), on_round=kill_group_at(12, 0))
    for name in ("rounds", "contributions", "shares"):
        pd.testing.assert_frame_equal(pd.read_parquet(disturbed / f"{name}.parquet"),
                                      pd.read_parquet(undisturbed / f"{name}.parquet"))
    manifest = pd.read_json(disturbed / "manifest.json", typ="series")
    assert manifest["recoveries"][0]["restored_from_round"] == 9


def test_contributions_report(tmp_path: Path, capsys) -> None:
    from dice_ray.api import open_run
    from dice_ray.cli.analyze import main as analyze

    out = _run(tmp_path / "rep", "--engine", "local", "--rounds", "6", "--topology", "exponential", "--misbehavior",
               "label-flip", "--misbehaving-selection", "ids", "--misbehaving-ids", "1", "--ledger",
               "--ledger-hops", "2")
    assert analyze(["contributions", str(out)]) == 0  # without leave-one-out: ledger only
    assert analyze(["contributions", str(out), "--loo", "--local"]) == 0  # computes loo.parquet now
    printed = capsys.readouterr().out
    assert "ledger total vs loo: Spearman" in printed
    report = pd.read_parquet(out / "contributions_report.parquet")
    # The ledger counts an update at its source and at each participant it first reaches (here with path weights
    # 1 + 0.75 + 0.375), leave-one-out once in the final loss: other units (measured 1.95x), said
    scale = open_run(out).contributions().scale["loo"]
    ratio = (report["total"] / report["loo_effect"]).to_numpy()
    assert scale == dict(zip(("low", "median", "high"), np.percentile(ratio, [25, 50, 75]), strict=True))
    assert scale["median"] > 1.5
    assert f"ledger total / leave-one-out effect: median {scale['median']:.3g} over participants" in printed
    assert len(report) == 8 and report["loo_effect"].notna().all() and report["shapley"].isna().all()
    assert report.loc[1, "misbehaving"] and sorted(report["rank"]) == list(range(1, 9))
    assert (out / "contributions_shares.png").stat().st_size > 0 and (out / "contributions_heatmap.png").is_file()
    capsys.readouterr()

    def refused(name: str, change: Callable[[Path], None], needle: str, *options: str) -> None:
        """A copy of the run with ``change`` made: the report says ``needle`` in one line, exit 2 (they were
        KeyError and ArrowInvalid tracebacks)."""
        run = tmp_path / name
        shutil.copytree(out, run)
        change(run)
        assert analyze(["contributions", str(run), *options]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err

    def rewrite(table: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
        def change(run: Path) -> None:
            path = run / f"{table}.parquet"
            schema = pq.read_schema(path)
            pq.write_table(pa.Table.from_pandas(edit(pd.read_parquet(path)), schema=schema, preserve_index=False),
                           path)
        return change

    refused("shares-cut", rewrite("shares", lambda t: t.head(6)), "lists 6 of the run's 8 participants in 6 rows")
    refused("shares-empty", rewrite("shares", lambda t: t.head(0)), "lists 0 of the run's 8 participants")
    refused("loo-foreign", rewrite("loo", lambda t: t.replace({"participant": {3: 12}})),
            "loo.parquet: participant 12 is not one of the run's 8 participants")
    refused("ledger-foreign", rewrite("contributions", lambda t: t.assign(target=t["target"] + 5)),
            "is not one of the run's 8 participants (nodes.parquet)")
    refused("shapley-cut", lambda run: (run / "shapley.parquet").write_text("PAR1"),
            "shapley.parquet is not a readable Parquet table", "--shapley", "3", "--local")
    plain = _run(tmp_path / "plain", "--engine", "local", "--rounds", "2")
    assert analyze(["contributions", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "ledger.enabled (--ledger)" in err and "contributions(loo=True)" in err
    assert "analyze contributions --loo / --shapley K" in err


def test_a_run_without_the_ledger_is_ranked_by_its_retraining(tmp_path: Path, capsys) -> None:
    """--loo alone: the report ranks by the leave-one-out effects with the ledger's rule (shares, harmful flags,
    ranks) and draws their matrix; Shapley added later is agreed with; Shapley alone ranks by itself."""
    from dice_ray.api import open_run
    from dice_ray.cli.analyze import main as analyze

    out = _run(tmp_path / "loo", "--engine", "local", "--rounds", "4", "--misbehavior", "label-flip",
               "--misbehaving-selection", "ids", "--misbehaving-ids", "1", "--loo")
    assert not (out / "shares.parquet").exists()
    assert analyze(["contributions", str(out)]) == 0
    assert "no ledger in this run: ranked by leave-one-out effect" in capsys.readouterr().out
    loo = pd.read_parquet(out / "loo.parquet")
    effect = loo[loo["participant"] >= 0].groupby("participant")["effect"].sum().to_numpy()
    report = pd.read_parquet(out / "contributions_report.parquet")
    expected = shares(effect, {})
    np.testing.assert_array_equal(report["loo_effect"], effect)
    for column in ("share", "harmful", "rank"):
        np.testing.assert_array_equal(report[column], expected[column])
    assert report["total"].isna().all() and report["shapley"].isna().all()
    assert report.loc[report["rank"] == 1, "loo_effect"].item() == effect.min()
    assert (out / "contributions_heatmap.png").is_file()

    stamp = (out / "loo.parquet").stat().st_mtime_ns
    assert analyze(["contributions", str(out), "--shapley", "2", "--local"]) == 0
    assert "leave-one-out effect vs shapley: Spearman" in capsys.readouterr().out
    assert (out / "loo.parquet").stat().st_mtime_ns == stamp  # Shapley alone: leave-one-out is not retrained
    both = open_run(out).contributions()
    assert both.ranking == "loo" and not both.ledger and both.variants == {}
    assert both.agreement["loo"]["spearman"] is None and both.agreement["shapley"]["spearman"] is not None
    np.testing.assert_allclose(both.matrix.sum(axis=1), effect, rtol=1e-12)  # row j: j's effect on each k

    plain = _run(tmp_path / "plain", "--engine", "local", "--rounds", "2")
    alone = open_run(plain).contributions(shapley=2, local=True)  # retrains a run made without any of them
    assert alone.ranking == "shapley" and alone.matrix is None and list(alone.figures()) == ["contributions_shares.png"]
    np.testing.assert_array_equal(alone.table["rank"], shares(alone.table["shapley"].to_numpy(), {})["rank"])


def test_time_varying_topology_ledger_equals_first_order_dice(tmp_path: Path) -> None:
    out = _run(tmp_path / "tv", "--engine", "local", "--rounds", "6", "--topology", "one-peer-exponential",
               "--ledger", "--ledger-hops", "2", "--influence", "--hops", "2", "--probe-rounds", "1,3",
               "--set", "influence.variants=[first-order]", "--set", "influence.ground_truth=false")
    ledger = pd.read_parquet(out / "contributions.parquet")
    dice = pd.read_parquet(out / "dice.parquet").query("hops == 2").set_index(["round", "source"])
    ours = ledger[ledger["probe_round"].isin([1, 3])].groupby(["probe_round", "source"])["influence"].sum()
    theirs = dice["est_first_order"]
    np.testing.assert_allclose(ours.to_numpy(), theirs.loc[ours.index].to_numpy(), rtol=1e-6,
                               atol=1e-6 * theirs.abs().max())


def test_the_shares_plot_of_many_participants_draws_ranks_in_a_fixed_width(tmp_path: Path) -> None:
    """Past NAMED_BARS participants the bars are drawn by rank, 12 inches wide (at N = 4,096 the plot was 172,032
    pixels wide and took 17 s to draw)."""
    from PIL import Image

    from dice_ray.reports.plots import DPI, NAMED_BARS, contribution_shares

    n = 4 * NAMED_BARS
    share = np.linspace(1, 0, n) / np.linspace(1, 0, n).sum()
    table = pd.DataFrame({"participant": np.arange(n)[::-1], "rank": np.arange(1, n + 1), "share": share,
                          "harmful": share == 0, "misbehaving": np.arange(n) % 7 == 0})
    contribution_shares(table, tmp_path / "shares.png")
    assert Image.open(tmp_path / "shares.png").size[0] <= 12 * DPI
    contribution_shares(table.head(NAMED_BARS), tmp_path / "named.png")
    assert Image.open(tmp_path / "named.png").size[0] > 5 * DPI  # one labelled bar per participant


def test_first_reached_path_weights_are_the_dense_products_on_time_varying_graphs() -> None:
    """F^{(s)}: the products of W over s rounds outside the support of the shorter ones, built sparse (dense N x N
    products took 2 GB each at N = 16,384, every round on a time-varying graph): the dense form's entries, to
    float64 rounding, with the same support."""
    import scipy.sparse as sp

    from dice_ray.methods.contributions import PathWeights

    rng = np.random.default_rng(0)
    for n in (7, 60):
        ws = []
        for _ in range(6):
            a = (rng.random((n, n)) < 3 / n) | np.eye(n, dtype=bool)
            ws.append(sp.csr_array(a / a.sum(axis=1, keepdims=True)))
        paths = PathWeights(lambda t, ws=ws: ws[t], n, static=False)
        for t in range(3):
            for s in (1, 2, 3):
                product, reached = np.eye(n), np.eye(n, dtype=bool)
                for u in range(s):
                    reached |= (product != 0) if u else reached
                    product = ws[t + u] @ product
                want = np.where(reached, 0.0, product)
                got = paths.first_reached(t, s).toarray()
                assert np.array_equal(got != 0, want != 0) and (want != 0).any()
                np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


def test_the_ledgers_float64_products_in_slices_equal_one_slice(monkeypatch) -> None:
    """The ledger keeps its updates in float32 (their float64 form is exact) and takes its float64 products a slice
    of the coordinates at a time (``core.tensors.FLOAT64_SLICE_BYTES``): in slices of 200 coordinates its terms are
    those of one slice to float64 rounding."""
    from dice_ray.config import build_config
    from dice_ray.core import tensors
    from dice_ray.engine import LocalEngine
    from dice_ray.experiment import prepare
    from dice_ray.methods.contributions import LedgerHook

    config = build_config({"nodes": 8, "rounds": 6, "seed": 1, "topology": {"name": "exponential"},
                           "data": {"dataset": "digits", "heldout_size": 32}, "optim": {"batch_size": 8},
                           "ledger": {"enabled": True, "hops": 2, "every": 1, "zprime": "heldout"}})

    def terms() -> list[dict]:
        engine = LocalEngine(prepare(config), [LedgerHook])
        return [engine.run_round(t, evaluate=False).records["ledger"][0] for t in range(5)]

    whole = [r and r["first"] for r in terms()]
    monkeypatch.setattr(tensors, "FLOAT64_SLICE_BYTES", 8 * 16 * 200)
    sliced = [r and r["first"] for r in terms()]
    assert sum(len(r["value"]) for r in whole if r) > 50
    for one, other in zip(whole, sliced, strict=True):
        if one is None:
            assert other is None
            continue
        for key in ("step", "probe_round", "source", "target"):
            np.testing.assert_array_equal(one[key], other[key])
        np.testing.assert_allclose(other["value"], one["value"], rtol=1e-12, atol=1e-12 * np.abs(one["value"]).max())
