"""Collaborator selection: each participant keeps m in-neighbours, W is Metropolis and row-stochastic, the
history table matches the W the engine used, and Ray places it as the local engine does."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dice_ray.cli.simulate import main as simulate
from dice_ray.methods.rewiring import in_neighbor_sets, is_rooted, metropolis_mixing, select_collaborators


def test_influence_keeps_the_m_most_helpful_candidates() -> None:
    current = [np.array([1, 2, 3]), np.array([0, 2]), np.array([0, 1]), np.array([0, 2])]
    table = {(0, 1): -3.0, (0, 2): 5.0, (0, 3): -1.0, (1, 0): 2.0, (1, 2): 1.0, (2, 0): -1.0, (2, 1): -2.0,
             (3, 0): 0.5, (3, 2): 0.1}

    def scores(k: int, pool: np.ndarray) -> np.ndarray:
        return np.array([table.get((k, int(nb)), np.nan) for nb in pool])

    chosen = select_collaborators("influence", current, 2, 0, np.random.default_rng(0), scores)
    assert [c.tolist() for c in chosen] == [[1, 3], [0, 2], [0, 1], [0, 2]]
    # an unscored candidate (read as 0) replaces a harmful neighbour but not a helpful one
    chosen = select_collaborators("influence", current, 2, 1, np.random.default_rng(0), scores)
    assert chosen[0].tolist() == [1, 3]
    assert set(chosen[3].tolist()) == {1, 2}  # 1 is 3's only non-neighbour: 0 beats 0.5, loses to 0.1
    rand = select_collaborators("random", current, 2, 1, np.random.default_rng(0))
    assert all(len(c) == 2 and k not in c for k, c in enumerate(rand))


def test_a_participant_that_scores_none_of_its_in_neighbours_keeps_them(capsys) -> None:
    """An audit found an examiner without validation data (every score NaN) rewiring at random, silently: its
    never-scored neighbours and the candidates all read 0, and the random tie-break chose. It has nothing to choose
    by, so it keeps them (m of them where it has more); the others still choose by their scores."""
    current = [np.array([1, 2, 3, 4])] + [np.array([(k + 1) % 8, (k + 2) % 8]) for k in range(1, 8)]

    def scores(k: int, pool: np.ndarray) -> np.ndarray:
        return np.full(len(pool), np.nan) if k == 0 else np.where(np.isin(pool, current[k]), 1.0, np.nan)

    for seed in range(5):
        chosen = select_collaborators("influence", current, 4, 3, np.random.default_rng(seed), scores)
        assert chosen[0].tolist() == [1, 2, 3, 4]
        # the others' neighbours score 1.0 (harmful): each keeps only the one its 3 candidates leave room for
        assert all(len(set(chosen[k].tolist()) & set(current[k].tolist())) == 1 for k in range(1, 8))
        fewer = select_collaborators("influence", current, 2, 3, np.random.default_rng(seed), scores)
        assert set(fewer[0].tolist()) <= {1, 2, 3, 4}

    from types import SimpleNamespace

    from dice_ray.methods.rewiring import Rewirer

    class Ledger:  # {0..3} and {4..7} each find their own helpful, the other group harmful: no group reaches all
        def cumulative(self, k: int, pool: np.ndarray) -> np.ndarray:
            return np.array([-1.0 if (k < 4) == (nb < 4) else 1.0 for nb in pool])

    settings = SimpleNamespace(mode="influence", every=2, keep=3, candidates=7, seed=None, outlier_z=3.0)
    complete = metropolis_mixing([np.setdiff1d(np.arange(8), [k]) for k in range(8)])
    rewirer = Rewirer(SimpleNamespace(seed=0, rewiring=settings), complete, Ledger())
    assert (rewirer.rewire(2) != complete).nnz == 0 and rewirer.fallbacks == [2]
    assert "rewiring before round 2: the participants' choices leave no group that reaches everyone (not rooted), " \
           "so W stays as it was until the next rewiring" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["influence", "outlier", "random"])
def test_every_participant_keeps_m_even_when_its_pool_would_hold_fewer(mode: str) -> None:
    """A ring's in-degree 2 with no extra candidates and m = 3: the pool takes the candidates it needs (it kept 2,
    and W's weights were 1/3, not the documented 1/(m + 1))."""
    ring = [np.array([(k - 1) % 8, (k + 1) % 8]) for k in range(8)]
    chosen = select_collaborators(mode, ring, 3, 0, np.random.default_rng(0),
                                  lambda k, pool: np.full(len(pool), np.nan))
    assert all(len(c) == 3 and k not in c and set(ring[k]) <= set(c.tolist()) | {k} for k, c in enumerate(chosen))


def test_outlier_rule_drops_only_harmful_outliers_of_the_neighbourhood() -> None:
    current = [np.array([1, 2, 3, 4, 5, 6])] + [np.array([0])] * 8
    base = {1: 0.010, 2: 0.012, 3: 0.011, 4: 0.009, 5: 0.013, 6: 0.080}  # all positive; 6 stands out

    def scores_from(table):
        return lambda k, pool: np.array([table.get(int(nb), np.nan) if k == 0 else np.nan for nb in pool])

    def choose(table, extra=2, keep=6, z=3.0):
        return select_collaborators("outlier", current, keep, extra, np.random.default_rng(0), scores_from(table),
                                    outlier_z=z)[0].tolist()

    first = choose(base)
    assert 6 not in first and {1, 2, 3, 4, 5} <= set(first) and len(first) == 6  # one new candidate
    # honest neighbours whose scores drifted positive stay (the absolute rule would swap them all)
    assert choose({**base, 6: 0.014}) == [1, 2, 3, 4, 5, 6]
    absolute = select_collaborators("influence", current, 6, 2, np.random.default_rng(0),
                                    scores_from({**base, 6: 0.014}))[0].tolist()
    assert absolute != [1, 2, 3, 4, 5, 6]
    # a helpful outlier (negative) is kept; a known outlier among the candidates is never taken
    assert choose({**base, 6: -0.5}) == [1, 2, 3, 4, 5, 6]
    assert 7 not in choose({**base, 7: 0.5, 8: 0.5}, extra=8) and len(choose({**base}, extra=0)) == 6
    # a stricter threshold keeps the outlier
    assert 6 in choose(base, z=100)


def test_metropolis_mixing_is_row_stochastic_metropolis_and_keeps_m() -> None:
    rng = np.random.default_rng(1)
    n, m = 12, 3
    sets = [np.sort(rng.choice(np.setdiff1d(np.arange(n), [k]), m, replace=False)) for k in range(n)]
    w = metropolis_mixing(sets)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert [s.tolist() for s in in_neighbor_sets(w)] == [s.tolist() for s in sets]
    dense = w.toarray()
    for k in range(n):
        for nb in sets[k]:
            assert dense[k, nb] == pytest.approx(1 / (1 + m))  # 1/(1 + max(deg_k, deg_l)), every in-degree m
        assert dense[k, k] == pytest.approx(1 - m / (1 + m))


def test_rooted_allows_excluded_participants_but_not_split_groups() -> None:
    heard_by_none = metropolis_mixing([np.array([1]), np.array([0]), np.array([0])])  # 2 listens, nobody hears it
    assert is_rooted(heard_by_none)
    split = metropolis_mixing([np.array([1]), np.array([0]), np.array([3]), np.array([2])])
    assert not is_rooted(split)
    assert is_rooted(sp.eye_array(1, format="csr"))


def _run(tmp_path, name: str, *flags: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = tmp_path / name
    assert simulate(["--no-progress", "--dataset", "digits", "--nodes", "10", "--rounds", "7", "--batch-size", "8",
                     "--seed", "5", "--misbehavior", "label-flip", "--misbehaving", "2", "--rewire-every", "3",
                     "--rewire-keep", "2", "--rewire-candidates", "2", "--out", str(out), *flags]) == 0
    proximal = pd.read_parquet(out / "proximal.parquet") if (out / "proximal.parquet").exists() else None
    return pd.read_parquet(out / "rewiring.parquet"), proximal


def _check_history(history: pd.DataFrame, proximal: pd.DataFrame | None, start: list[list[int]]) -> None:
    current = {k: set(nb) for k, nb in enumerate(start)}
    assert sorted(set(history["round"])) == [3, 6]
    for t, rows in history.groupby("round"):
        for k, mine in rows.groupby("participant"):
            kept = set(mine.loc[mine["action"] == "kept", "neighbor"])
            added = set(mine.loc[mine["action"] == "added", "neighbor"])
            dropped = set(mine.loc[mine["action"] == "dropped", "neighbor"])
            assert kept | dropped == current[k] and not kept & dropped
            assert len(kept | added) == 2 and k not in kept | added and not added & current[k]
            current[k] = kept | added
        if proximal is not None:  # the engine mixed over exactly the new in-neighbours from round t on
            used = proximal[proximal["round"] == t].groupby("examiner")["neighbor"].apply(set).to_dict()
            assert used == current
            np.testing.assert_allclose(proximal.loc[proximal["round"] == t, "weight"], 1 / 3)


def test_rewiring_history_matches_the_w_used_and_ray_equals_local(ray_local, tmp_path) -> None:
    from dice_ray.core.topology import make_topology

    start = [nb.tolist() for nb in in_neighbor_sets(make_topology("exponential", 10).mixing_matrix(0))]
    history, proximal = _run(tmp_path, "local", "--engine", "local", "--proximal", "--rewire", "influence")
    _check_history(history, proximal, start)
    scored = history.dropna(subset=["cumulative_score"])
    first_added = history[(history["round"] == 3) & (history["action"] == "added")]
    assert len(scored) and first_added["cumulative_score"].isna().all()  # never neighbours before: unscored
    ray_history, ray_proximal = _run(tmp_path, "ray", "--actors", "2", "--proximal", "--rewire", "influence")
    pd.testing.assert_frame_equal(history.drop(columns="cumulative_score"),
                                  ray_history.drop(columns="cumulative_score"))
    np.testing.assert_allclose(ray_proximal["score"], proximal["score"], rtol=1e-5, atol=1e-8)
    random_history, _ = _run(tmp_path, "random", "--engine", "local", "--rewire", "random")
    _check_history(random_history, None, start)
    assert random_history["cumulative_score"].isna().all()


def test_a_run_says_which_participants_cannot_score_and_they_keep_their_neighbours(tmp_path, capsys) -> None:
    """A participant with one sample gets no validation split (a Dirichlet partition of small alpha makes some), so
    every score it would give its in-neighbours is NaN (null in the tables): it keeps them at each rewiring, and the
    run says so once, at the start."""
    import dice_ray
    from dice_ray.experiment import prepare

    out = tmp_path / "blind"
    flags = {"nodes": 16, "rounds": 9, "seed": 0, "data": {"dataset": "digits", "partition": "dirichlet",
                                                           "alpha": 0.02},
             "optim": {"batch_size": 1}, "proximal": {"enabled": True},
             "rewiring": {"mode": "influence", "every": 4, "keep": 4, "candidates": 2},
             "output": {"out": str(out), "progress": False}}
    config = dice_ray.as_config(flags)
    blind = [k for k, v in enumerate(prepare(config).partition.val) if not len(v)]
    assert blind  # the partition this test needs
    dice_ray.run(config, engine="local")
    proximal, history = pd.read_parquet(out / "proximal.parquet"), pd.read_parquet(out / "rewiring.parquet")
    assert proximal.loc[proximal["examiner"].isin(blind), "score"].isna().all()
    mine = history[history["participant"].isin(blind)]
    assert set(mine["action"]) == {"kept"} and mine["cumulative_score"].isna().all()
    err = capsys.readouterr().err
    assert err.count(f"warning: {len(blind)} participant(s) ({', '.join(map(str, blind))}) have no validation data "
                     f"to score their in-neighbours on, so they keep them at every rewiring") == 1


def test_candidates_are_drawn_as_from_the_list_of_others_without_building_it() -> None:
    """``_draw_others`` draws what ``rng.choice`` over the ascending list of the other participants draws (the
    rewired graphs stay the same), without an O(N) list per participant (43 s per rewiring at N = 16,384)."""
    from dice_ray.methods.rewiring import _draw_others

    for n in (5, 40, 3000, 20_000):
        for seed in range(10):
            excluded = np.random.default_rng(seed + 99).choice(n, min(6, n - 1), replace=True)  # repeats, unsorted
            others = np.setdiff1d(np.arange(n), excluded)
            for size in (1, 3, len(others) + 2):
                want = np.random.default_rng(seed).choice(others, min(size, len(others)), replace=False)
                np.testing.assert_array_equal(_draw_others(n, excluded, size, np.random.default_rng(seed)), want)
