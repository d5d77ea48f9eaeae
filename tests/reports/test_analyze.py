"""The influence stage of a run (Ray tasks) and the alignment report read from its tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dice_ray.cli.analyze import main as analyze
from dice_ray.cli.simulate import main as simulate
from dice_ray.results import ALIGNMENT, DICE, INFLUENCE

RUN = ["--dataset", "digits", "--nodes", "6", "--topology", "ring", "--batch-size", "8", "--rounds", "6",
       "--heldout-size", "64", "--influence", "--hops", "2", "--probe-rounds", "1,3", "--probe-samples", "1",
       "--no-progress", "--set", "influence.sources_per_task=3"]


@pytest.fixture(scope="module")
def influence_run(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ray"
    assert simulate([*RUN, "--out", str(out)]) == 0
    return out


def test_influence_tables_cover_every_probe(influence_run: Path) -> None:
    influence = pd.read_parquet(influence_run / "influence.parquet")
    dice = pd.read_parquet(influence_run / "dice.parquet")
    assert list(influence.columns) == INFLUENCE.names and list(dice.columns) == DICE.names
    # 2 rounds x 6 sources x (whole batch + 1 sample) probes, 2 hops each
    assert dice["probe_id"].nunique() == 24 and len(dice) == 48
    assert dice["sample_index"].isna().sum() == 24
    # ring: step s reaches the 2s+1 participants within s hops of j; step 0 is j itself
    steps = influence.groupby(["probe_id", "step"])["target"].count().unstack()
    assert (steps[0] == 1).all() and (steps[1] == 3).all() and (steps[2] == 5).all()
    assert (influence["distance"] <= influence["step"]).all()
    # the cumulative DICE is the running sum of the hop terms
    for col in ("gt", "est_first_order", "est_curvature"):
        wide = dice.pivot(index="probe_id", columns="hops", values=[col, f"{col}_hop"])
        np.testing.assert_allclose(wide[(col, 2)] - wide[(col, 1)], wide[(f"{col}_hop", 2)], atol=1e-9)
    # estimates track the ground truth (a trained-from-scratch 6-node ring, early rounds)
    whole = dice[dice["sample_index"].isna() & (dice["hops"] == 1)]
    assert np.corrcoef(whole["gt"], whole["est_curvature"])[0, 1] > 0.9


def test_influence_numbers_do_not_depend_on_the_engine(influence_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "local"
    assert simulate([*RUN, "--engine", "local", "--out", str(out)]) == 0
    a = pd.read_parquet(influence_run / "influence.parquet")
    b = pd.read_parquet(out / "influence.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-8)


def test_alignment_report(influence_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze(["alignment", str(influence_run)]) == 0
    table = pd.read_parquet(influence_run / "alignment.parquet")
    assert list(table.columns) == ALIGNMENT.names
    assert set(table["quantity"]) == {"hop", "cumulative", "terms"} and set(table["hops"]) == {1, 2}
    assert table["spearman"].between(-1, 1).all() and (table["relative_error"] >= 0).all()
    assert (influence_run / "alignment_hop1.png").stat().st_size > 1000
    assert "spearman" in capsys.readouterr().out
    from dice_ray.reports import alignment_report, cascade_report

    # a path as a string, as open_run takes it (was a TypeError)
    pd.testing.assert_frame_equal(alignment_report(str(influence_run)).table, alignment_report(influence_run).table)
    pd.testing.assert_frame_equal(cascade_report(str(influence_run)).decay, cascade_report(influence_run).decay)


def test_the_correction_measures_a_variants_part_beyond_first_order_without_ground_truth() -> None:
    """Σ|E − E_curvature| / Σ|E_curvature| per hop, for second-order and exact-readout only: 0.1 where they add a
    tenth to every term, 3 where they add three times it (an Adam probe outside the expansion read 2-4e6)."""
    from dice_ray.reports.alignment import alignment_rows

    first = np.array([1.0, -2.0, 0.5, 4.0, -1.0, 2.0])
    hops = np.array([1, 1, 1, 2, 2, 2])
    beyond = np.where(hops == 1, 1.1, 4.0) * first
    dice = {"hops": hops, "gt": first, "gt_hop": first, "est_first_order": first, "est_first_order_hop": first,
            "est_curvature": first, "est_curvature_hop": first, "est_second_order": beyond,
            "est_second_order_hop": beyond, "est_exact_readout": first * np.nan,
            "est_exact_readout_hop": first * np.nan}
    rows = {(r["hops"], r["quantity"], r["variant"]): r["correction"] for r in alignment_rows(dice)}
    assert rows[(1, "cumulative", "second-order")] == pytest.approx(0.1)
    assert rows[(2, "hop", "second-order")] == pytest.approx(3.0)
    assert rows[(1, "hop", "curvature")] is None and ("exact-readout" not in {k[2] for k in rows})  # not measured


@pytest.mark.parametrize("argv", [["foo", "run"], ["anomaly", "run", "--horizon", "x"], []])
def test_a_usage_error_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        analyze(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err


def test_alignment_of_a_run_without_influence_is_an_error(tmp_path: Path, capsys) -> None:
    assert simulate(["--dataset", "digits", "--nodes", "4", "--rounds", "1", "--engine", "local", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 0  # a finished run, no dice table
    capsys.readouterr()
    assert analyze(["alignment", str(tmp_path / "run")]) == 2
    assert "--influence" in capsys.readouterr().err


def cascade_run(tmp_path: Path, topology: str) -> Path:
    out = tmp_path / topology
    assert simulate(["--engine", "local", "--dataset", "digits", "--nodes", "12", "--topology", topology,
                     "--batch-size", "16", "--rounds", "10", "--influence", "--hops", "3", "--set", "influence.last=2",
                     "--set", "influence.variants=[first-order]", "--no-progress", "--out", str(out)]) == 0
    return out


def test_cascade_report_shows_ripples_decaying_with_distance(tmp_path: Path, capsys) -> None:
    run = cascade_run(tmp_path, "ring")
    assert analyze(["cascade", str(run)]) == 0
    printed = capsys.readouterr().out  # every participant of a ring has the same degree: no rank to correlate
    assert "out_degree: -" in printed and "(-: the same value for every participant, which ranks nothing)" in printed
    decay = pd.read_parquet(run / "cascade.parquet").query("step == 3").sort_values("distance")
    assert decay["distance"].tolist() == [0, 1, 2, 3]
    assert (np.diff(decay["mean_abs"]) < 0).all()  # every hop further, a smaller influence
    pairwise = pd.read_parquet(run / "pairwise.parquet")
    assert len(pairwise) == 12 * 7  # after 3 rounds on a ring, j reaches the 7 participants within 3 hops
    assert (run / "pairwise_heatmap.png").stat().st_size > 1000 and (run / "cascade_decay.png").exists()


def test_cascade_report_ranks_no_rounding_noise(tmp_path: Path, capsys) -> None:
    """Every participant of an exponential graph has the same betweenness, which networkx computes 1.4e-17 apart
    (12 participants): the report said 'betweenness: -0.1' (a correlation with rounding), now '-' as for degree."""
    assert analyze(["cascade", str(cascade_run(tmp_path, "exponential"))]) == 0
    assert "out_degree: -  betweenness: -  closeness: -" in capsys.readouterr().out


def test_cascade_reports_of_several_runs_share_one_figure(tmp_path: Path, capsys) -> None:
    """Several runs (or --out): each one's report, and their decay after R rounds in cascade_comparison.png."""
    runs = [cascade_run(tmp_path / "a", "ring"), cascade_run(tmp_path / "b", "ring")]  # one name, two folders
    assert analyze(["cascade", *map(str, runs), "--out", str(tmp_path / "compare")]) == 0
    printed = capsys.readouterr().out
    assert all(f"== {run}" in printed for run in runs) and all((run / "cascade.parquet").is_file() for run in runs)
    assert "by hop distance of a/ring (ring, gt, R = 3); b/ring (ring, gt, R = 3)" in printed  # two lines, not one
    assert (tmp_path / "compare" / "cascade_comparison.png").stat().st_size > 10_000
    assert analyze(["alignment", str(runs[0]), "--out", str(tmp_path / "x")]) == 2
    assert "--out is an option of the collaborators or cascade report, not of alignment" in capsys.readouterr().err
    fresh = cascade_run(tmp_path / "c", "ring")
    plain = tmp_path / "plain"  # a run without influence after a good one: refused before anything is written
    assert simulate(["--dataset", "digits", "--nodes", "4", "--rounds", "1", "--engine", "local", "--no-progress",
                     "--out", str(plain)]) == 0
    capsys.readouterr()
    assert analyze(["cascade", str(fresh), str(plain), "--out", str(tmp_path / "never")]) == 2
    assert "influence.parquet does not exist" in capsys.readouterr().err
    assert not (fresh / "cascade.parquet").exists() and not (tmp_path / "never").exists()


def test_cascade_report_relates_influence_to_position(tmp_path: Path, capsys) -> None:
    run = cascade_run(tmp_path, "star")
    assert analyze(["cascade", str(run)]) == 0
    pairwise = pd.read_parquet(run / "pairwise.parquet")
    strength = pairwise.assign(size=pairwise["influence"].abs()).groupby("source")["size"].sum()
    assert strength.idxmax() == 0  # the hub's data reaches everyone first
    assert "out_degree: 0." in capsys.readouterr().out  # a positive rank correlation with degree


@pytest.fixture(scope="module")
def run_without_ground_truth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "no-gt"
    assert simulate(["--engine", "local", "--dataset", "digits", "--nodes", "8", "--topology", "ring", "--batch-size",
                     "16", "--rounds", "8", "--influence", "--hops", "2", "--set", "influence.last=2", "--set",
                     "influence.ground_truth=false", "--variants", "first-order,curvature,second-order",
                     "--no-progress", "--out", str(out)]) == 0
    return out


def test_alignment_of_a_run_without_ground_truth_is_an_error(run_without_ground_truth: Path, capsys) -> None:
    assert analyze(["alignment", str(run_without_ground_truth)]) == 2
    assert "no ground truth" in capsys.readouterr().err
    assert not (run_without_ground_truth / "alignment.parquet").exists()


def test_cascade_of_a_run_without_ground_truth_reads_the_best_estimate(run_without_ground_truth: Path) -> None:
    assert analyze(["cascade", str(run_without_ground_truth)]) == 0
    decay = pd.read_parquet(run_without_ground_truth / "cascade.parquet")
    assert set(decay["value"]) == {"est_second_order"}
    assert np.isfinite(decay["mean_abs"]).all() and (decay["mean_abs"] > 0).all()


def test_alignment_scatter_draws_every_variant(tmp_path: Path) -> None:
    from dice_ray.methods.dice.estimator import VARIANTS
    from dice_ray.reports import plots
    from dice_ray.reports.alignment import VARIANTS as COLUMNS

    rng = np.random.default_rng(0)
    dice = pd.DataFrame({"hops": np.ones(20, int), "gt": rng.normal(size=20), "gt_hop": rng.normal(size=20)})
    for column in COLUMNS.values():
        dice[column], dice[f"{column}_hop"] = rng.normal(size=20), rng.normal(size=20)
    assert list(COLUMNS) == list(VARIANTS)
    figure = plots.alignment_scatter(dice, dict(COLUMNS), 1, tmp_path / "scatter.png")
    for axes in figure.axes:
        assert len(axes.collections) == len(VARIANTS)  # one scatter per variant
        assert len({tuple(c.get_paths()[0].vertices.round(3).ravel()) for c in axes.collections}) == len(VARIANTS)


def test_cascade_of_a_run_with_exact_readout_alone(tmp_path: Path) -> None:
    out = tmp_path / "exact"
    assert simulate(["--engine", "local", "--dataset", "digits", "--nodes", "6", "--topology", "ring", "--rounds", "6",
                     "--influence", "--hops", "2", "--set", "influence.last=2", "--set", "influence.ground_truth=false",
                     "--variants", "exact-readout", "--no-progress", "--out", str(out)]) == 0
    assert analyze(["cascade", str(out)]) == 0
    assert set(pd.read_parquet(out / "cascade.parquet")["value"]) == {"est_exact_readout"}


def test_a_heatmap_of_sampled_sources_draws_their_rows_only(tmp_path: Path) -> None:
    """With sampled sources most rows of the pairwise matrix are unmeasured: the heat-map draws the probed sources'
    rows only (at N = 1,024 each row was 0.4 pixel), and a full matrix as it is."""
    import numpy as np

    from dice_ray.reports.plots import signed_heatmap

    matrix = np.full((200, 200), np.nan)
    matrix[[3, 50, 199]] = np.linspace(-1, 1, 600).reshape(3, 200)
    assert signed_heatmap(matrix, "t", tmp_path / "sampled.png").tolist() == [3, 50, 199]
    full = np.arange(16.0).reshape(4, 4) - 8
    assert signed_heatmap(full, "t", tmp_path / "full.png").tolist() == [0, 1, 2, 3]
    assert (tmp_path / "sampled.png").stat().st_size > 0 and (tmp_path / "full.png").stat().st_size > 0
