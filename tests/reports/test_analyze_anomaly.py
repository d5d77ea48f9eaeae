"""The detection report and the collaborator comparison: metrics against hand-computed answers, and the
files they write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dice_ray.cli.analyze import main as analyze
from dice_ray.cli.simulate import main as simulate
from dice_ray.reports.detection import detection_metrics, running_scores, suspects
from dice_ray.reports.detection import rounds_to as _rounds_to


def _toy() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Examiner 0 hears 1 (honest) and 2 (anomalous), examiner 1 hears 0 and 2, for rounds 0..3. Examiner 0
    ranks 2 worst from round 1 on (cumulative: 2 > 1 from round 1), examiner 1 only from round 3."""
    rows = []
    score = {(0, 1): [0.0, -1, -1, -1], (0, 2): [-1.0, 2, 0, 0], (1, 0): [1.0, 1, 1, -5], (1, 2): [0.0, 0, 0, 3]}
    cosine = {(0, 1): 0.9, (0, 2): 0.1, (1, 0): 0.1, (1, 2): 0.5}
    for t in range(4):
        for (k, nb), s in score.items():
            rows.append({"round": t, "examiner": k, "neighbor": nb, "weight": 0.5, "score": s[t],
                         "update_cosine": cosine[(k, nb)], "neighbor_is_anomalous": nb == 2})
    rounds = pd.DataFrame({"round": np.repeat(range(4), 3), "node": np.tile(range(3), 4),
                           "train_loss": np.tile([1.0, 2.0, 3.0], 4).astype(np.float32)})
    return pd.DataFrame(rows), rounds


def test_detection_metrics_by_hand() -> None:
    proximal, rounds = _toy()
    scores = running_scores(proximal, rounds, window=2)
    by = {r["method"]: r for r in detection_metrics(scores, horizon=4)}
    # cumulative after round 3: (0,1) -3, (0,2) 1, (1,0) -2, (1,2) 3: both anomalous pairs on top
    assert by["proximal"]["auc"] == 1.0 and by["proximal"]["precision"] == 1.0
    assert by["proximal"]["auc_examiner_mean"] == 1.0 and by["proximal"]["examiners"] == 2
    # examiner 0: separated from round 1 on (delay 2 scoring rounds); examiner 1: from round 3 (delay 4)
    assert by["proximal"]["detected"] == 1.0
    assert by["proximal"]["delay_median"] == 3.0 and by["proximal"]["delay_max"] == 4.0
    # windowed (2 rounds) at round 3: (0,1) -2, (0,2) 0, (1,0) -4, (1,2) 3
    assert by["proximal-window"]["auc"] == 1.0
    # train loss of the neighbour: node 2 has the largest; cosine distance 1 - cos: (0,2) 0.9 > (0,1) 0.1,
    # but examiner 1 hears 0 at distance 0.9 and 2 at 0.5: 2 ranks best there
    assert by["train-loss"]["auc"] == 1.0
    assert by["cosine"]["precision"] == 0.5 and by["cosine"]["detected"] == 0.5
    early = {r["method"]: r for r in detection_metrics(scores, horizon=1)}
    # round 0 alone: anomalous -1 and 0 against honest 0 and 1: one tie among four pairs
    assert early["proximal"]["auc"] == 0.125


def test_suspects_by_hand() -> None:
    """Each participant's mean cumulative proximal score over its examiners, highest first: 2 is scored 1 by examiner
    0 and 3 by examiner 1 (mean 2), 0 is scored -2, 1 is scored -3."""
    ranked = suspects(running_scores(*_toy(), window=2), horizon=4)
    assert ranked["participant"].tolist() == [2, 0, 1] and ranked["rank"].tolist() == [1, 2, 3]
    assert ranked["score"].tolist() == [2.0, -2.0, -3.0] and ranked["examiners"].tolist() == [2, 1, 1]
    assert ranked["misbehaving"].tolist() == [True, False, False]


def test_auc_over_time_by_hand() -> None:
    scores = running_scores(*_toy(), window=2)
    by = {r["method"]: r for r in detection_metrics(scores, horizon=4)}
    # cumulative proximal AUC after rounds 0..3: 0.125, 0.5 (anomalous 1, 0 against honest -1, 2), 0.5, 1.0
    assert by["proximal"]["auc_mean"] == pytest.approx((0.125 + 0.5 + 0.5 + 1.0) / 4)
    assert by["proximal"]["rounds_to_auc"] == 4  # 0.95 first reached after the 4th scoring round
    assert by["train-loss"]["auc_mean"] == 1.0 and by["train-loss"]["rounds_to_auc"] == 1
    shorter = {r["method"]: r for r in detection_metrics(scores, horizon=3)}
    assert shorter["proximal"]["rounds_to_auc"] is None and shorter["proximal"]["auc_mean"] == pytest.approx(0.375)
    # reaching the level counts only if the AUC stays there: a dip after round 1 restarts the count
    assert _rounds_to(0.95, np.array([0.96, 0.90, 0.97, 0.99])) == 3
    assert _rounds_to(0.95, np.array([np.nan, 0.96, 0.99])) == 2
    assert _rounds_to(0.95, np.array([0.96, 0.90])) is None


def test_anomaly_report_writes_table_and_png(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert simulate(["--engine", "local", "--no-progress", "--dataset", "digits", "--nodes", "12", "--rounds", "8",
                     "--batch-size", "16", "--lr", "0.1", "--val-fraction", "0.2", "--misbehavior", "label-flip",
                     "--misbehaving", "3", "--proximal", "--out", str(run)]) == 0
    assert analyze(["anomaly", str(run), "--horizon", "4", "--horizon", "8"]) == 0
    table = pd.read_parquet(run / "anomaly.parquet")
    assert sorted(set(table["horizon"])) == [4, 8]
    assert set(table["method"]) == {"proximal", "proximal-window", "train-loss", "cosine"}
    assert ((table["auc"] >= 0) & (table["auc"] <= 1)).all()
    assert (run / "anomaly_roc.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "rounds_to_auc" in line)  # the table's own column names
    assert header.split() == list(table.columns)  # (it printed "AUC mean AUC to 0.95 AUC/exam min exams ...")
    ranked = pd.read_parquet(run / "suspects.parquet")  # who misbehaves, named: every participant, most suspect first
    assert sorted(ranked["participant"]) == list(range(12)) and ranked["score"].is_monotonic_decreasing
    assert ranked["misbehaving"].sum() == 3
    top = ", ".join(f"{r.participant} ({r.score:.3g}" for r in ranked.head(5).itertuples())
    assert "suspects, by mean cumulative proximal influence over the examiners that score them: " in printed
    assert all(f"{r.participant} ({r.score:.3g}" in printed for r in ranked.head(5).itertuples()), top
    assert analyze(["anomaly", str(run), "--horizon", "4", "--horizon", "100"]) == 2  # beyond the run's 8 rounds
    assert "horizons (--horizon) 100" in capsys.readouterr().err
    import dice_ray

    with pytest.raises(dice_ray.InputError, match="horizons: give at least one"):  # not the defaults in silence
        dice_ray.open_run(run).anomaly([])
    for bad in (2, "5", [2.5]):  # TypeErrors
        with pytest.raises(dice_ray.InputError, match="a list of round numbers"):
            dice_ray.open_run(run).anomaly(bad)
    assert analyze(["anomaly", str(run), "--horizon", "4", "--horizon", "4"]) == 2
    assert "horizons (--horizon) 4 is given twice" in capsys.readouterr().err
    numbers = dice_ray.open_run(run).anomaly([1]).drop(columns="method")  # NaN where undefined, not None
    assert all(kind in "fi" for kind in numbers.dtypes.map(lambda d: d.kind)), numbers.dtypes
    assert analyze(["anomaly", str(run), "--shapley", "2"]) == 2  # another report's option is not ignored
    assert "--shapley is an option of the contributions report" in capsys.readouterr().err
    plain = tmp_path / "plain"
    assert simulate(["--engine", "local", "--no-progress", "--dataset", "digits", "--nodes", "6", "--rounds", "2",
                     "--out", str(plain)]) == 0
    assert analyze(["anomaly", str(plain)]) == 2
    assert "proximal.enabled (--proximal)" in capsys.readouterr().err
    import json
    import shutil

    stopped = tmp_path / "stopped"  # a run killed before its end: its tables are not written yet
    shutil.copytree(run, stopped)
    (stopped / "proximal.parquet").unlink()
    manifest = json.loads((stopped / "manifest.json").read_text())
    (stopped / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    assert analyze(["anomaly", str(stopped)]) == 2
    assert "is not a complete run" in (err := capsys.readouterr().err) and "--resume" in err
    unfinished = tmp_path / "unfinished"  # stopped too, but made without the methods: finishing it writes no table
    shutil.copytree(plain, unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    for report, flag in (("anomaly", "proximal.enabled (--proximal)"),
                         ("alignment", "influence.enabled (--influence)")):
        assert analyze([report, str(unfinished)]) == 2  # it said to resume, and after the resume to enable the method
        assert flag in (err := capsys.readouterr().err) and "resume" not in err, err
    import pyarrow.parquet as pq

    empty = tmp_path / "empty"  # an empty proximal table: it drew an empty ROC and wrote "-" everywhere, exit 0
    shutil.copytree(run, empty)
    pq.write_table(pq.read_table(empty / "proximal.parquet").slice(0, 0), empty / "proximal.parquet")
    assert analyze(["anomaly", str(empty)]) == 2
    assert "proximal.parquet holds no rows" in capsys.readouterr().err
    short = tmp_path / "short"  # nodes.parquet cut: it said "1 misbehaving of 10", exit 0
    shutil.copytree(run, short)
    pq.write_table(pq.read_table(short / "nodes.parquet").slice(0, 10), short / "nodes.parquet")
    assert analyze(["anomaly", str(short)]) == 2
    assert "manifest.json records 12 participants, nodes.parquet 10" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["none", "influence"])
def test_collaborators_report_compares_runs(tmp_path, mode: str, capsys) -> None:
    runs = []
    for rewire in dict.fromkeys(("none", mode)):  # mode none: the static run alone
        out = tmp_path / f"rewire-{rewire}"
        if not out.exists():
            flags = [] if rewire == "none" else ["--rewire", rewire, "--rewire-every", "2", "--rewire-keep", "2"]
            assert simulate(["--engine", "local", "--no-progress", "--dataset", "digits", "--nodes", "8", "--rounds",
                             "4", "--misbehavior", "label-flip", "--misbehaving", "1", "--proximal", "--out", str(out),
                             *flags]) == 0
        runs.append(str(out))
    capsys.readouterr()
    assert analyze(["collaborators", *runs, "--out", str(tmp_path / "new" / "folder")]) == 0  # made if missing
    table = pd.read_parquet(tmp_path / "new" / "folder" / "collaborators.parquet")
    assert table["honest_acc"].between(0, 1).all() and table["misbehaving"].tolist() == [1] * len(runs)
    assert table["fallbacks"].tolist() == [0] * len(runs)
    printed = capsys.readouterr().out
    assert " ±      - " in printed and "± 0.0000" not in printed  # one seed: no spread (it printed 0.0000)
    import json

    manifest = json.loads((Path(runs[-1]) / "manifest.json").read_text())
    for fallbacks, code in (([2], 0), (5, 2)):  # a rewiring that kept W is noted; a changed record is one line
        (Path(runs[-1]) / "manifest.json").write_text(json.dumps({**manifest, "rewiring_fallbacks": fallbacks}))
        assert analyze(["collaborators", *runs, "--out", str(tmp_path)]) == code
        captured = capsys.readouterr()
        if code == 0:
            assert f"note: {runs[-1]}: 1 rewiring(s) kept the previous W (the choices were not rooted" in captured.out
        else:
            assert "rewiring_fallbacks is int, not the list of rounds a run writes" in captured.err
    (Path(runs[-1]) / "manifest.json").write_text(json.dumps(manifest))
    from dice_ray.reports import collaborators_report

    assert len(collaborators_report(runs).table) == len(runs)  # paths as strings
    assert analyze(["collaborators", *runs, runs[0]]) == 2  # the same run twice is not two seeds
    assert analyze(["anomaly", runs[0], runs[-1]]) == 2  # one run directory only
    (tmp_path / "a-file").write_text("")
    assert analyze(["collaborators", *runs, "--out", str(tmp_path / "a-file")]) == 2  # was a traceback


def test_collaborators_report_tells_a_kinds_options_apart(tmp_path, capsys) -> None:
    """Two static runs of one seed, label-flip of all labels and of half: two settings, not one setting's duplicate
    seed (the report keyed runs by the kind's name alone and refused the pair)."""
    runs = []
    for share in ("1.0", "0.5"):
        runs.append(str(tmp_path / f"flip-{share}"))
        assert simulate(["--engine", "local", "--no-progress", "--dataset", "digits", "--nodes", "6", "--rounds", "2",
                         "--misbehavior", "label-flip", "--misbehaving", "1", "--set",
                         f"misbehavior.flip_fraction={share}", "--out", runs[-1]]) == 0
    capsys.readouterr()
    assert analyze(["collaborators", *runs]) == 0
    printed = capsys.readouterr().out
    assert "label-flip(flip_fraction=0.5) x1" in printed and "label-flip(flip_fraction=1.0) x1" in printed
    table = pd.read_parquet(tmp_path / "collaborators.parquet")
    assert sorted(table["misbehavior_options"]) == ['{"flip_fraction": 0.5}', '{"flip_fraction": 1.0}']  # the field
    from dice_ray.reports import collaborators_report

    assert len(collaborators_report(runs).summary) == 2
    assert analyze(["collaborators", runs[0], runs[0]]) == 2  # the same options twice are still one seed twice
    assert '{"flip_fraction": 1.0}' in capsys.readouterr().err
    other = str(tmp_path / "other-lr")  # another learning rate is another study (it was averaged as a seed)
    assert simulate(["--engine", "local", "--no-progress", "--dataset", "digits", "--nodes", "6", "--rounds", "2",
                     "--lr", "0.5", "--seed", "1", "--out", other]) == 0
    capsys.readouterr()
    assert analyze(["collaborators", runs[0], other]) == 2
    assert f"runs {runs[0]} and {other} differ in optim.lr (0.05 and 0.5): compare runs of one study" in (
        capsys.readouterr().err)


def test_detection_compares_every_in_neighbour_scored_so_far() -> None:
    """On a time-varying graph an examiner scores one in-neighbour a round: the anomalous one alone in round 0 (no
    comparison yet), the honest one alone in round 1, ranked above the anomalous one's latest score: not detected.
    The same examiner counted each round alone was 'detected' in round 0 and from then on."""
    from dice_ray.reports.detection import separation

    frame = pd.DataFrame({"method": ["proximal"] * 3, "round": [0, 1, 2], "examiner": [0, 0, 0],
                          "neighbor": [2, 1, 2], "value": [1.0, 5.0, 6.0], "anomalous": [True, False, True]})
    separated = separation(frame)
    assert separated.index.tolist() == [("proximal", 1, 0), ("proximal", 2, 0)]
    assert separated.tolist() == [False, True]  # round 2: the anomalous one's 6 beats the honest one's latest 5
    everyone = frame.assign(anomalous=True)  # no honest in-neighbour: nothing to separate from
    assert separation(everyone).empty


def test_anomaly_of_a_run_where_everyone_misbehaves_is_one_line(tmp_path, capsys) -> None:
    """No examiner has an honest neighbour: a report of dashes and exit 0 before; now one line, exit 2, as a run
    where no one misbehaves."""
    run = tmp_path / "all-bad"
    assert simulate(["--engine", "local", "--no-progress", "--dataset", "digits", "--nodes", "4", "--rounds", "3",
                     "--misbehavior", "sign-flip", "--misbehaving", "4", "--proximal", "--out", str(run)]) == 0
    capsys.readouterr()
    assert analyze(["anomaly", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "every participant misbehaves" in err


def test_pairs_an_examiner_without_z_prime_scores_are_left_out_with_a_warning(tmp_path, capsys) -> None:
    """Participants with one sample get no validation split, so as examiners on their own z′ they score NaN: a
    finished run, whose anomaly report leaves those pairs out, saying so (it was scikit-learn's "Input contains NaN",
    and then a line blaming the table)."""
    out = tmp_path / "run"
    assert simulate(["--engine", "local", "--dataset", "synthetic", "--set", "data.synthetic_samples=40", "--set",
                     "data.synthetic_classes=2", "--nodes", "24", "--topology", "ring", "--rounds", "3", "--proximal",
                     "--batch-size", "1", "--misbehavior", "label-flip", "--misbehaving", "4", "--no-progress",
                     "--out", str(out)]) == 0
    scores = pd.read_parquet(out / "proximal.parquet")["score"]
    assert scores.isna().any() and scores.notna().any()
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(said) == 1 and "participants have no validation samples" in said[0]  # said before the run, too
    assert analyze(["anomaly", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    said = f"{scores.isna().sum()} of {len(scores)} proximal scores are not numbers"
    assert len(warnings) == 1 and said in warnings[0]
    table = pd.read_parquet(out / "anomaly.parquet")
    assert table["auc"].notna().all()


def test_the_windowed_detector_is_the_tables_window_score() -> None:
    """proximal.window sums the run's last ``window`` scoring rounds (the table's ``window_score``). On a time-varying
    graph a pair is not scored each round: examiner 0 scores neighbour 1 in rounds 0 and 3 only, so with a window
    of 2 rounds its windowed score after round 3 is round 3's alone, not rounds 0 and 3 added (which the report
    used to compute, the pair's own last 2 scorings)."""
    rows = [{"round": t, "examiner": 0, "neighbor": nb, "weight": 0.5, "score": s, "update_cosine": 0.5,
             "neighbor_is_anomalous": nb == 2}
            for t, nb, s in [(0, 1, 5.0), (0, 2, 1.0), (1, 2, 1.0), (2, 2, 1.0), (3, 1, 1.0), (3, 2, 1.0)]]
    proximal = pd.DataFrame(rows)
    window = {(0, 1): 5.0, (0, 2): 1.0, (1, 2): 2.0, (2, 2): 2.0, (3, 1): 1.0, (3, 2): 2.0}  # the run's last 2 rounds
    proximal["window_score"] = [window[(r["round"], r["neighbor"])] for r in rows]
    rounds = pd.DataFrame({"round": np.repeat(range(4), 3), "node": np.tile(range(3), 4),
                           "train_loss": np.ones(12, np.float32)})
    scores = running_scores(proximal, rounds, window=2)
    mine = scores[scores["method"] == "proximal-window"]
    last = mine[mine["round"] == 3].set_index("neighbor")["value"]
    assert last[1] == 1.0 and last[2] == 2.0


def test_precision_at_the_anomalous_count_counts_ties_in_expectation() -> None:
    """A free rider's examiner sees equal scores for all its in-neighbours: precision followed the table's row order
    (1.0 or 0.0 for the same scores); now the expected value under a random order of the tied."""
    from dice_ray.reports.detection import precision_at

    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        anomalous = np.array([False, False, True])[order]
        assert precision_at(np.ones(3), anomalous, 1) == pytest.approx(1 / 3)
    assert precision_at(np.array([3.0, 1.0, 1.0]), np.array([False, True, False]), 2) == pytest.approx(0.25)
    assert precision_at(np.array([3.0, 2.0, 1.0]), np.array([True, False, False]), 1) == 1.0


def test_separation_and_examiner_aucs_equal_their_dense_forms_without_a_column_per_participant() -> None:
    """``separation`` keeps one column per in-neighbour an examiner scored (not one per participant: 10 GiB at
    N = 4,096), and ``examiner_aucs`` ranks within examiners at once (one ``roc_auc_score`` each took 100 s there):
    the same answers as the dense pivot and scikit-learn, on a random time-varying graph with ties."""
    from sklearn.metrics import roc_auc_score

    from dice_ray.reports.detection import examiner_aucs, separation

    rng = np.random.default_rng(0)
    rows = []
    for k in range(40):
        heard = rng.choice(200, size=rng.integers(3, 7), replace=False)
        for t in range(6):
            for nb in heard[rng.random(len(heard)) < 0.7]:
                rows.append({"method": "proximal", "round": t, "examiner": k, "neighbor": int(nb),
                             "value": float(rng.integers(0, 4)), "anomalous": bool(nb % 5 == 0)})
    frame = pd.DataFrame(rows)
    wide = frame.pivot_table(index=["method", "examiner", "round"], columns="neighbor", values="value",
                             aggfunc="last", sort=True).groupby(level=["method", "examiner"]).ffill()
    flags = frame.groupby("neighbor")["anomalous"].first().reindex(wide.columns).to_numpy(bool)
    best, worst = wide.loc[:, flags].min(axis=1), wide.loc[:, ~flags].max(axis=1)
    dense = (best > worst)[best.notna() & worst.notna()].reorder_levels(["method", "round", "examiner"]).sort_index()
    assert len(dense) > 50 and dense.any() and not dense.all()
    pd.testing.assert_series_equal(separation(frame), dense, check_names=False)
    last = frame.groupby(["examiner", "neighbor"]).tail(1)
    expected = [roc_auc_score(g["anomalous"], g["value"]) for _, g in last.groupby("examiner")
                if 0 < g["anomalous"].sum() < len(g)]
    assert len(expected) > 10
    np.testing.assert_allclose(examiner_aucs(last), expected, rtol=0, atol=1e-12)
