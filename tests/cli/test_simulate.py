"""The command line: tables, manifest, same numbers for any actor count, bad input, interrupted runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dice_ray.cli.simulate import OPTIONS, SWITCHES, build_parser, main
from dice_ray.results import ROUNDS

SMALL = ["--nodes", "6", "--rounds", "6", "--dataset", "digits", "--batch-size", "8", "--heldout-size", "64",
         "--no-progress"]


def test_run_writes_documented_tables_and_manifest(ray_local, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main([*SMALL, "--eval-every", "2", "--out", str(out), "--topology", "ring"]) == 0
    done = capsys.readouterr().err.strip().splitlines()[-1]
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert list(rounds.columns) == ROUNDS.names
    assert len(rounds) == 6 * 6 and sorted(rounds["node"].unique()) == list(range(6))
    assert rounds["train_loss"].notna().all()
    evaluated = sorted(rounds.loc[rounds["val_loss"].notna(), "round"].unique())
    assert evaluated == [1, 3, 5]  # every 2nd round, and the last
    per_round = rounds.dropna(subset=["consensus_distance"]).groupby("round")["consensus_distance"].nunique()
    assert (per_round == 1).all()  # network-level: one value per round
    assert rounds["val_acc"].dropna().between(0, 1).all()
    # it learns: held-out loss falls from the first to the last evaluation
    by_round = rounds.groupby("round")["heldout_loss"].mean()
    assert by_round[5] < by_round[1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["nodes"] == 6 and manifest["config"]["topology"]["name"] == "ring"
    assert {"torch", "ray", "dice_ray"} <= set(manifest["versions"])
    assert manifest["seed"] == 0 and manifest["end_time"] >= manifest["start_time"]
    # the rate is the round loop's (the actors' start is not training): its seconds, within the whole run's
    assert 0 < manifest["training_seconds"] < manifest["wall_seconds"]
    assert manifest["rounds_per_second"] == pytest.approx(6 / manifest["training_seconds"])
    assert done.startswith("done: rounds 0..5 x 6 participants in ") and " s in all; " in done
    nodes = pd.read_parquet(out / "nodes.parquet")
    assert nodes["q"].sum() == pytest.approx(1.0) and (nodes["in_degree"] == 2).all()
    # documented schema travels with the file
    assert pq.read_schema(out / "rounds.parquet").field("consensus_distance").metadata[b"description"]


@pytest.mark.slow  # CI's default run stays under 20 minutes; python -m pytest -q -m slow runs it
def test_rounds_table_identical_for_1_3_and_n_actors(ray_local, tmp_path: Path) -> None:
    tables, states = [], []
    for actors in ("1", "3", "6"):
        out = tmp_path / f"a{actors}"
        assert main([*SMALL, "--actors", actors, "--out", str(out), "--init", "independent", "--save-states"]) == 0
        tables.append(pd.read_parquet(out / "rounds.parquet"))
        states.append(np.load(out / "states.npy"))
    for other, other_states in zip(tables[1:], states[1:], strict=True):
        pd.testing.assert_frame_equal(tables[0], other, check_exact=False, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(states[0], other_states, atol=1e-5)  # final θ of every participant
    assert states[0].shape[0] == 6 and np.isfinite(states[0]).all()


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path: Path) -> None:
    def losses(seed: str, name: str) -> np.ndarray:
        assert main([*SMALL, "--engine", "local", "--seed", seed, "--out", str(tmp_path / name)]) == 0
        return pd.read_parquet(tmp_path / name / "rounds.parquet")["train_loss"].to_numpy()

    a, b, c = losses("3", "a"), losses("3", "b"), losses("4", "c")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


BAD_INPUTS = [
    (["--topology", "rin"], "topology 'rin' is unknown"),
    (["--lr", "0"], "learning rate"),
    (["--lr", "-0.1"], "learning rate"),
    (["--nodes", "1"], "nodes"),
    (["--weights", "fancy"], "weight rule"),
    (["--dataset", "imagenet"], "data set 'imagenet' is unknown"),
    (["--actors", "2", "--transport", "cuda_ipc"], "transport 'cuda_ipc' moves half-steps between actors sharing a "
                                                    "GPU, but gpus_per_actor is 0"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/folder"], "data.download (--download)"),
    (["--dataset", "mnist"], "data.data_dir (--data-dir)"),
    (["--model", "transformer"], "model 'transformer' is unknown"),
    (["--optimizer", "lamb"], "optimizer 'lamb' is unknown"),
    (["--batch-size", "500"], "fewer than optim.batch_size (--batch-size) 500"),
    (["--nodes", "2000", "--dataset", "digits"], "nodes (--nodes) 2000 exceeds"),
    (["--partition", "random"], "partition 'random' is unknown"),
    (["--rounds", "0"], "rounds"),
    (["--eval-every", "0"], "eval_every"),
    (["--nodes", "abc"], "invalid int value"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--topolgy", "ring"], "unrecognized arguments: --topolgy ring; did you mean --topology?"),
    (["--never-registered-scale", "2"], "a registered method's options are flags once its module is imported"),
    (["--model", "cnm"], "(did you mean 'cnn'?)"),
    (["--model", "my-net"], "(one you register is known once its module is imported: imports, --imports MODULE)"),
    (["--topology", "rnig"], "choose one of ring, exponential, grid, torus, star, complete, erdos-renyi, "),
    (["--set", "optim.lr=fast"], "lr"),
    (["--set", "optim.colour=red"], "unknown key 'optim.colour'"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
    # a participant with one sample has no validation split: its z′ loss was NaN, and the ledger's shares all 0
    (["--nodes", "16", "--partition", "dirichlet", "--alpha", "0.05", "--val-fraction", "0.2", "--batch-size", "1",
      "--seed", "0", "--ledger", "--ledger-zprime", "validation"],
     "participant 2 has no validation samples (1 in all), and ledger.zprime"),
    # a folder given for a file, or a file for a folder, said "does not exist"
    (["--config", "/"], "config file '/' is a folder, not a file"),
    (["--topology", "file", "--topology-file", "/"], "is a folder, not a file"),
    (["--dataset", "cifar10", "--data-dir", __file__], "is a file, not a folder"),
    (["--topology", "file"], "topology.file"),
    (["--gpus-per-actor", "-1"], "gpus_per_actor"),
    (["--alpha", "0", "--partition", "dirichlet"], "alpha"),
    # used to be ignored: no one misbehaved
    (["--misbehaving", "2"], "--misbehaving needs misbehavior.kind (--misbehavior KIND)"),
    (["--misbehavior", "label-flip"], "misbehavior.kind 'label-flip' needs how many misbehave"),
    (["--misbehavior", "scale", "--misbehaving-ids", "1", "--misbehaving-selection", "degree"],
     "misbehavior.ids are used with selection 'ids', not 'degree'"),
    (["--misbehavior", "scale", "--misbehaving", "1", "--misbehaving-fraction", "0.5"],  # the fraction used to win
     "misbehavior.count and misbehavior.fraction both say how many"),
    (["--misbehavior", "scale", "--misbehaving", "3", "--misbehaving-ids", "0,1"],
     "misbehavior.count would be ignored"),
    # a probe set that is empty used to pass, and the run failed after training
    (["--influence", "--hops", "2", "--probe-every", "20"], "influence.every 20 probes no round"),
    (["--influence", "--probe-rounds", ","], "influence.rounds is empty"),
    (["--influence", "--probe-sources", ","], "influence.sources is empty"),
    # an id or round listed twice was accepted, and counted once
    (["--misbehavior", "sign-flip", "--misbehaving-ids", "0,0"], "misbehavior.ids: lists 0 twice"),
    (["--influence", "--hops", "1", "--probe-rounds", "1,1"], "influence.rounds: lists 1 twice"),
    (["--influence", "--hops", "1", "--probe-sources", "2,3,2"], "influence.sources: lists 2 twice"),
    (["--shrink-ids", "1,1"], "data.shrink.ids: lists 1 twice"),
    (["--influence", "--hops", "1", "--probe-rounds", "0", "--probe-every", "3"],  # every used to be ignored
     "influence.rounds and influence.every both choose the probe rounds"),
    # a method's option with the method off did nothing
    (["--hops", "2"], "--hops applies to influence, which this run leaves off (influence.enabled, --influence)"),
    (["--proximal-window", "3"], "--proximal-window applies to proximal"),
    (["--rewire", "none", "--rewire-every", "3"], "--rewire-every applies to rewiring"),
    (["--ledger-every", "2"], "--ledger-every applies to ledger"),
    (["--shrink-fraction", "0.5"], "--shrink-fraction applies to data.shrink"),
    (["--alpha", "0.3"], "--alpha applies only with data.partition (--partition) dirichlet; this run has "
                         "data.partition iid"),
    (["--partition", "dirichlet", "--shards-per-node", "3"],
     "--shards-per-node applies only with data.partition (--partition) shards"),
    # an option of another choice was recorded in the manifest and did nothing (an audit: --momentum 0.5 with SGD)
    (["--momentum", "0.5"], "--momentum applies only with optim.name (--optimizer) momentum; this run has "
                            "optim.name sgd (give --optimizer momentum too)"),
    (["--optimizer", "adam", "--momentum", "0.5"], "--momentum applies only with optim.name (--optimizer) momentum"),
    (["--set", "optim.betas=[0.8,0.9]"], "--set optim.betas applies only with optim.name (--optimizer) adam"),
    (["--topology", "ring", "--edge-probability", "0.3"],
     "--edge-probability applies only with topology.name (--topology) erdos-renyi"),
    (["--grid-rows", "4"],
     "--grid-rows applies only with topology.name (--topology) grid or torus; this run has topology.name exponential"),
    (["--topology", "ring", "--topology-file", "ring.csv"],
     "--topology-file applies only with topology.name (--topology) file"),
    (["--set", "data.alpha=0.3"], "--set data.alpha applies only with data.partition (--partition) dirichlet"),
    # weights of a topology that sets its own were recorded and did nothing (an audit: a sweep over them)
    (["--topology", "random-matching", "--weights", "metropolis"],
     "--weights turns a static graph into W; topology random-matching sets its own weights"),
    (["--topology", "file", "--topology-file", "w.npy", "--weights", "metropolis"],
     "--weights applies to an edge list; topology.file 'w.npy' holds W itself"),
    (["--topology", "file", "--topology-file", "w.npz", "--set", "topology.directed=true"],
     "--set topology.directed applies to an edge list; topology.file 'w.npz' holds W itself"),
    (["--set", "influence.hops=3"], "--set influence.hops applies to influence, which this run leaves off"),
    (["--set", "rounds=10", "--rounds", "20"], "--rounds and --set rounds=10 both set rounds: give one"),
    (["--set", "misbehavior.count=2"], "--set misbehavior.count needs misbehavior.kind (--misbehavior KIND)"),
]


def test_misbehaving_ids_name_who_misbehaves(tmp_path: Path) -> None:
    """--misbehaving-ids alone selects those participants (it used to be ignored under the default selection)."""
    out = tmp_path / "run"
    assert main([*SMALL, "--engine", "local", "--rounds", "1", "--misbehavior", "sign-flip", "--misbehaving-ids",
                 "1,4", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["misbehaving"] == [1, 4]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv: list[str], message: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main([*SMALL, *argv, "--out", str(out)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert message in err
    assert not out.exists()


def test_disconnected_or_non_stochastic_w_file_is_rejected(tmp_path: Path, capsys) -> None:
    disconnected = np.kron(np.eye(2), np.full((3, 3), 1 / 3))  # two separate triangles
    np.save(tmp_path / "w_split.npy", disconnected)
    np.save(tmp_path / "w_bad.npy", np.full((6, 6), 0.2))
    for name, message in (("w_split.npy", "strongly connected"), ("w_bad.npy", "sums to")):
        code = main([*SMALL, "--topology", "file", "--topology-file", str(tmp_path / name),
                     "--out", str(tmp_path / "run")])
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_not_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([*SMALL, "--engine", "local", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "output.overwrite (--overwrite)" in err and "output.out (--out)" in err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "plot.png").write_bytes(b"mine")  # --overwrite deleted a folder's PNG and Parquet files: only a run's now
    assert main([*SMALL, "--engine", "local", "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a dice-ray run directory (no manifest.json)" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "plot.png"]
    assert main([*SMALL, "--engine", "local", "--out", ""]) == 2  # the working directory, which overwrite would sweep
    assert "output.out: String should have at least 1 character" in capsys.readouterr().err


def test_an_option_is_given_in_full_and_a_names_case_is_suggested(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse took --node 8 for --nodes (a prefix a later option could make ambiguous); a data set's name in
    capitals had no suggestion."""
    with pytest.raises(SystemExit) as stop:
        main([*SMALL, "--node", "8"])
    assert stop.value.code == 2
    said = capsys.readouterr().err.strip()
    assert said == "error: unrecognized arguments: --node 8; did you mean --nodes? (see --help)"
    assert main([*SMALL, "--dataset", "MNIST"]) == 2
    assert "(did you mean 'mnist'?)" in capsys.readouterr().err


def test_help_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, dotted, *_ in [*OPTIONS, *SWITCHES]:
        assert flag in text and f"config {dotted}" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpus-per-actor", "1"], "engine.gpus_per_actor (--gpus-per-actor) 1.0 but the Ray cluster has 0 GPUs"),
    (["--gpus-per-task", "0.5"], "engine.gpus_per_task (--gpus-per-task) 0.5 but the Ray cluster has 0 GPUs"),
    (["--actors", "2", "--cpus-per-actor", "2"], "2 actors x engine.cpus_per_actor (--cpus-per-actor) 2 exceed "
     "the cluster's 2 CPUs"),
])
def test_a_cluster_that_cannot_hold_the_run_exits_2_before_touching_its_directory(
        ray_local, argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What the Ray cluster lacks (GPUs, CPUs) is known once Ray is reached, and checked then: before the run
    directory is made, or an earlier run's tables in it are removed (``--overwrite``)."""
    out = tmp_path / "run"
    assert main([*SMALL, *argv, "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not out.exists()
    out.mkdir()
    (out / "rounds.parquet").write_bytes(b"an earlier run's")
    (out / "manifest.json").write_text("{}")
    assert main([*SMALL, *argv, "--out", str(out), "--overwrite"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rounds.parquet"]
    assert (out / "rounds.parquet").read_bytes() == b"an earlier run's"


@pytest.mark.parametrize(("imports", "stop", "engine"), [([], "SIGINT", "local"), (["--imports", "json"], "SIGINT",
                                                                                  "local"),
                                                    ([], "SIGTERM", "local"),
                                                    pytest.param([], "SIGTERM", "ray", marks=pytest.mark.slow)])
def test_ctrl_c_or_sigterm_is_one_line_with_how_to_resume(tmp_path: Path, imports: list[str], stop: str,
                                                          engine: str) -> None:
    """SIGINT to a running simulate (as Ctrl-C sends): one line that says how to continue, exit 130, the manifest
    marked interrupted. A run whose config imports modules continues only with --allow-imports: the line says so.
    SIGTERM (a scheduler's stop) the same, exit 143 (it left the manifest "running", with no line; on the Ray engine,
    whose driver start installs Ray's own handler, it dumped a stack and aborted)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from child_processes import as_in_a_terminal, killed_if_left

    out = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, "-m", "dice_ray.simulate", "--engine", engine, "--dataset", "digits",
                                "--nodes", "4", "--rounds", "1000000", "--checkpoint-every", "0", "--no-progress",
                                "--out", str(out), *imports], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=as_in_a_terminal)
    with killed_if_left(process):
        deadline = time.monotonic() + 120
        while not (out / "manifest.json").is_file() and time.monotonic() < deadline:  # training has started
            time.sleep(0.2)
        time.sleep(1.0)
        process.send_signal(getattr(signal, stop))
        _, err = process.communicate(timeout=120)
    assert process.returncode == (130 if stop == "SIGINT" else 143), err[-2000:]
    said = "interrupted" if stop == "SIGINT" else "terminated (SIGTERM)"
    assert err.strip().splitlines()[-1] == (f"{said}; continue with python -m dice_ray.simulate --resume {out}"
                                            + (" --allow-imports" if imports else ""))
    assert "Traceback" not in err
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"


def test_a_methods_flags_read_values_as_the_built_in_flags_of_their_type() -> None:
    """A registered method's generated flags read an int, a float, integers (2,3) and names (a,b) as the built-in
    flags do; --half-scale-ids 2,3 was read as YAML, the string '2,3', and refused as no list."""
    from dice_ray.cli.simulate import _flag_kind, _or_null, build_parser

    assert _flag_kind(int) is int and _flag_kind(float) is float and _flag_kind(bool) == "bool"
    assert _flag_kind(list[int]) == "int-list" and _flag_kind(list[float]) == "float-list"
    assert _flag_kind(list[str]) == "list" and _flag_kind(dict[str, int]) == "yaml"
    assert _flag_kind(int | None) == ("null", int) and _flag_kind(list[int] | None) == ("null", "int-list")
    assert _flag_kind(dict[str, int] | None) == "yaml" and _or_null(int, "null") is None and _or_null(int, "3") == 3
    import toy_method  # noqa: F401 (registers scaled_norm: enabled bool, scale float)

    args = build_parser().parse_args(["--scaled-norm-enabled", "true", "--scaled-norm-scale", "2"])
    assert vars(args)["scaled_norm.enabled"] is True and vars(args)["scaled_norm.scale"] == 2.0
    assert isinstance(vars(args)["scaled_norm.scale"], float)  # read as FLOAT, not as YAML's int 2
    assert vars(build_parser().parse_args(["--scaled-norm-enabled"]))["scaled_norm.enabled"] is True  # as --proximal
    assert vars(build_parser().parse_args(["--scaled-norm-enabled", "false"]))["scaled_norm.enabled"] is False


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_the_influence_stage_shows_its_progress_in_probes(engine: str, ray_local, tmp_path: Path, capsys) -> None:
    """The stage's bar counted tasks (one per probe round, several probes each): "4/4 task" for 8 probes."""
    out = tmp_path / "run"
    argv = [arg for arg in SMALL if arg != "--no-progress"]
    assert main([*argv, "--engine", engine, "--influence", "--hops", "1", "--probe-rounds", "1,3", "--out",
                 str(out)]) == 0
    probes = len(pd.read_parquet(out / "dice.parquet")["probe_id"].unique())
    bar = capsys.readouterr().err.split("influence:")[-1]
    assert probes > 2 and f"{probes}/{probes} [" in bar and ("probe/s" in bar or "s/probe" in bar)
