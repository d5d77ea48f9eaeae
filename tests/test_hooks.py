"""The round-hook seam: a new method defined here, in one place, runs on every engine with the same numbers;
no private name crosses modules."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

import dice_ray
from dice_ray.hooks import Inbox, Method, RoundHook, RowsDriver

PACKAGE = Path(dice_ray.__file__).parent

UPDATE_NORM = pa.schema([("round", pa.int32()), ("node", pa.int32()), ("norm", pa.float64()),
                         ("mixed_norm", pa.float64())])


class UpdateNorm(RoundHook):
    """A toy method: ||Δ_k^t|| of every participant's update, and ||Σ_l W_kl Δ_l|| of what gossip mixes of them
    (the messages: every block sends its updates to the blocks whose rows of W read it)."""

    name = "update_norm"

    @classmethod
    def sends(cls, config):
        return lambda t: True

    def before_local_step(self, t: int) -> None:
        self.before = self.block.population.params.clone()

    def after_local_step(self, t: int) -> None:
        self.delta = (self.block.population.params - self.before).double()

    def message(self, t: int, local: bool):
        return self.delta  # other blocks receive it as a numpy array

    def after_gossip(self, t: int, inbox: Inbox):
        mixed = sum(torch.as_tensor(w.toarray()) @ torch.as_tensor(m)
                    for w, m in zip(inbox.weights, inbox.messages, strict=True))
        return {"round": np.full(self.block.size, t, np.int32), "node": self.block.nodes.astype(np.int32),
                "norm": self.delta.norm(dim=1), "mixed_norm": mixed.norm(dim=1)}  # tensors: the driver gets numpy


class UpdateNormTable(RowsDriver):
    name = "update_norm"
    tables = {"update_norm": UPDATE_NORM}


UPDATE_NORM_METHOD = Method("update_norm", lambda config: True, UpdateNorm, UpdateNormTable)
CONFIG = {"nodes": 9, "rounds": 6, "seed": 2, "data": {"dataset": "digits", "heldout_size": 64},
          "proximal": {"enabled": True, "zprime": "heldout"},
          "output": {"progress": False, "eval_every": 3, "checkpoint_every": 4}}


class ShortColumn(UpdateNorm):  # one column with a value per block, not per participant
    def after_gossip(self, t: int, inbox: Inbox):
        return {**super().after_gossip(t, inbox), "mixed_norm": [0.0]}


class MisnamedColumn(UpdateNorm):  # "mixed" where the schema says "mixed_norm"
    def after_gossip(self, t: int, inbox: Inbox):
        record = super().after_gossip(t, inbox)
        return {**{k: v for k, v in record.items() if k != "mixed_norm"}, "mixed": record["mixed_norm"]}


@pytest.mark.parametrize(("hook", "message"), [
    (ShortColumn, r"method 'update_norm', round 0, table 'update_norm': columns of different lengths \(round 9, "
                  r"node 9, norm 9, mixed_norm 1\)"),
    (MisnamedColumn, r"method 'update_norm', round 0, table 'update_norm': the rows' columns are not the schema's "
                     r"\(missing: mixed_norm; not in the schema: mixed\)"),
])
def test_a_methods_rows_that_do_not_fit_its_table_name_the_method_and_the_table(hook, message, tmp_path) -> None:
    """Rows a method's driver returns are checked against the table's schema, so a mistake in a new method reads as
    one message naming the method, the round and the table (it was Arrow's "Column 2 named ... expected length", or
    a bare KeyError)."""
    method = Method("update_norm", lambda config: True, hook, UpdateNormTable)
    with pytest.raises(ValueError, match=message):
        dice_ray.run(dice_ray.as_config(CONFIG, output={"out": str(tmp_path / "r")}),
                     engine="local", methods=[method])


class Tampering(UpdateNorm):  # halves participant 0's update: training would follow it, no measurement would
    def after_local_step(self, t: int) -> None:
        super().after_local_step(t)
        self.block.population.params[0] *= 0.5


class TamperingSender(UpdateNorm):  # the same, while composing its message
    def message(self, t: int, local: bool):
        self.block.population.params[0] *= 0.5
        return super().message(t, local)


class TamperingAtBirth(UpdateNorm):  # the same, once, when the hook is built
    def __init__(self, block, config) -> None:
        super().__init__(block, config)
        block.population.params[0] *= 0.5


class TamperingSaver(UpdateNorm):  # the same, while saving its part of a checkpoint
    def snapshot(self, t: int):
        self.block.population.params[0] *= 0.5
        return {}


class DataTampering(UpdateNorm):  # flips participants' labels in place: training follows, no measurement would
    def before_local_step(self, t: int) -> None:
        super().before_local_step(t)
        self.block.y_data[:] = 9 - self.block.y_data


class OptimizerTampering(UpdateNorm):  # steps with a learning rate of its own
    def before_local_step(self, t: int) -> None:
        import dataclasses

        super().before_local_step(t)
        pop = self.block.population
        pop.optimizer = dataclasses.replace(pop.optimizer, lr=pop.optimizer.lr * 100)


@pytest.mark.parametrize(("hook", "changed", "call"), [
    (Tampering, "the participants' states", "after_local_step of round 0"),
    (TamperingSender, "the participants' states", "message of round 0"),
    (TamperingAtBirth, "the participants' states", "__init__"),
    (TamperingSaver, "the participants' states", "snapshot of round 3"),
    (DataTampering, "their data", "before_local_step of round 0"),
    (OptimizerTampering, "the optimizer's settings", "before_local_step of round 0"),
])
def test_a_hook_that_changes_training_is_refused(hook, changed: str, call: str, tmp_path) -> None:
    """A hook that changed θ^{t+½} changed training, but DICE's replays, proximal influence and the ledger measured
    the run without the change (an audit found DICE tables equal to an honest run's): the engine refuses it, in
    every call it makes to a hook (an audit changed training from ``__init__`` and ``snapshot`` unseen), and for the
    optimizer's settings and the data too."""
    method = Method("update_norm", lambda config: True, hook, UpdateNormTable)
    with pytest.raises(ValueError, match=f"hook 'update_norm' changed {changed} in {call}: a round hook observes"):
        dice_ray.run(dice_ray.as_config(CONFIG, output={"out": str(tmp_path / "r")}), engine="local", methods=[method])


class Counter(UpdateNorm):  # saves a key without its name: another method's, or the state's
    key = "count"

    def snapshot(self, t: int):
        return {self.key: np.full(self.block.size, t)}


class StateSaver(Counter):
    key = "state"


@pytest.mark.parametrize(("hooks", "key"), [((Counter, Counter), "count"), ((StateSaver,), "state")])
def test_a_snapshot_key_two_owners_save_is_refused(hooks, key: str, tmp_path) -> None:
    """Every hook's restore reads the whole checkpoint: two methods saving 'count' resumed one from the other's, and a
    hook saving 'state' overwrote the participants' (the resumed run trained from [N, 1]); both were silent."""
    methods = [Method(f"m{i}", lambda config: True, type(f"H{i}", (h,), {"name": f"m{i}"}),
                      type(f"D{i}", (UpdateNormTable,), {"name": f"m{i}", "tables": {f"m{i}": UPDATE_NORM}}))
               for i, h in enumerate(hooks)]
    with pytest.raises(ValueError, match=f"hook 'm{len(hooks) - 1}' saves '{key}' in its snapshot, a key the "
                                         "participants' state or another hook saves already"):
        dice_ray.run(dice_ray.as_config(CONFIG, output={"out": str(tmp_path / "r")}), engine="local", methods=methods)


@pytest.fixture(scope="module")
def by_value(ray_local):
    """Ray workers unpickle this test module's classes by value (a user's notebook gets that for free)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_new_method_runs_the_same_on_every_engine(by_value, tmp_path: Path) -> None:
    tables = []
    for engine, actors in (("local", None), ("ray", 1), ("ray", 3)):
        config = dice_ray.as_config(CONFIG, engine={"actors": actors}, output={"out": str(tmp_path / str(actors))})
        run = dice_ray.run(config, engine=engine, methods=[UPDATE_NORM_METHOD])
        assert {"update_norm", "proximal", "rounds"} <= set(run.tables())
        tables.append(run.update_norm)
    first = tables[0]
    assert len(first) == 9 * 6 and (first["norm"] > 0).all() and (first["mixed_norm"] > 0).all()
    for other in tables[1:]:
        pd.testing.assert_frame_equal(other, first, check_exact=False, rtol=1e-6)


def test_a_method_name_used_twice_is_refused(tmp_path: Path) -> None:
    config = dice_ray.as_config(CONFIG, output={"out": str(tmp_path / "x")})
    with pytest.raises(dice_ray.InputError, match="used twice"):
        dice_ray.run(config, engine="local", methods=[UPDATE_NORM_METHOD, Method("update_norm", lambda c: True)])
    assert not (tmp_path / "x").exists()


class Unnamed(RoundHook):  # name left at the default
    def after_gossip(self, t: int, inbox: Inbox) -> dict:
        return {"round": [t] * self.block.size, "node": self.block.nodes}


class Misnamed(UpdateNorm):
    name = "norms"


class RoundsTable(RowsDriver):
    name, tables = "counts", {"rounds": UpdateNormTable.tables["update_norm"]}


@pytest.mark.parametrize(("method", "says"), [
    (Method("proximal", lambda c: True, UpdateNorm, UpdateNormTable), "'proximal' is a built-in method"),
    (Method("nodes", lambda c: True, UpdateNorm, UpdateNormTable), "'nodes' is a built-in method or run config field"),
    (Method("update_norm", lambda c: True, Misnamed, UpdateNormTable),
     "method 'update_norm': its Misnamed is named 'norms'; set name = 'update_norm' on it"),
    (Method("unnamed", lambda c: True, Unnamed, None), "method 'unnamed': its Unnamed is named 'hook'"),
    (Method("counts", lambda c: True, None, RoundsTable),
     "method 'counts': table 'rounds' is dice-ray's rounds.parquet"),
])
def test_a_method_the_engine_would_mix_up_is_refused_before_the_run(tmp_path: Path, method: Method, says: str) -> None:
    """A name the run config or a built-in method has (its section would replace the built-in one), a hook named
    otherwise than its method (its records reached no driver: the table was silently empty), a table another
    writes: one line, before any work; ``register_method`` refuses the names at once."""
    config = dice_ray.as_config(CONFIG, output={"out": str(tmp_path / "x")})
    with pytest.raises(dice_ray.InputError, match=says) as err:
        dice_ray.run(config, engine="local", methods=[method])
    assert len(str(err.value).splitlines()) == 1 and not (tmp_path / "x").exists()
    if "named" in says:
        with pytest.raises(ValueError, match=says):
            dice_ray.register_method(method)
        assert method.name not in {m.name for m in dice_ray.hooks.registered_methods()}


def test_two_methods_writing_one_table_are_refused(tmp_path: Path) -> None:
    config = dice_ray.as_config(CONFIG, output={"out": str(tmp_path / "x")})
    twin = type("Twin", (UpdateNormTable,), {"name": "twin"})
    with pytest.raises(dice_ray.InputError, match="method 'twin': table 'update_norm' is method 'update_norm''s"):
        dice_ray.run(config, engine="local", methods=[UPDATE_NORM_METHOD, Method("twin", lambda c: True, None, twin)])


def _modules() -> list[str]:
    return sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
                  for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, in a fresh interpreter: a cycle would fail one of them (partially
    initialized module)."""
    script = ("import importlib, sys\nfailed = []\nfor name in sys.argv[1:]:\n"
              "    for m in [k for k in sys.modules if k.startswith('dice_ray')]:\n        del sys.modules[m]\n"
              "    try:\n        importlib.import_module(name)\n"
              "    except Exception as err:\n        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
              "print('\\n'.join(failed))\n")
    out = subprocess.run([sys.executable, "-c", script, *_modules()], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names, at module level) of every ``from dice_ray… import …`` in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    return [(node.module, [a.name for a in node.names], id(node) in top) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dice_ray")]


def test_no_private_name_across_modules() -> None:
    """No module imports another's private (``_``) name (import cycles: ``tests/test_architecture.py``)."""
    for name in _modules():
        base = PACKAGE.parent / name.replace(".", "/")
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        for module, names, _ in _imports(path):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{name} imports private {private} from {module}"


def test_engines_know_no_method_by_name() -> None:
    for path in (PACKAGE / "engine").glob("*.py"):
        for module, _, _ in _imports(path):
            assert not module.startswith("dice_ray.methods"), f"{path.name} imports {module}"


def test_checkpoints_hold_arrays_only(tmp_path: Path) -> None:
    """The hooks' and drivers' state in a checkpoint loads with allow_pickle=False (no object arrays)."""
    config = dice_ray.as_config(CONFIG, ledger={"enabled": True, "hops": 2},
                                output={"out": str(tmp_path / "k"), "keep_checkpoints": True})
    run = dice_ray.run(config, engine="local")
    [checkpoint] = sorted((run.path / "checkpoints").glob("round-*"))[-1:]
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert set(meta["sha256"]) == {"state.npz", "driver.npz"}
    with np.load(checkpoint / "driver.npz", allow_pickle=False) as arrays:
        assert {"proximal.sums", "ledger.sums"} <= set(arrays.files)
    with np.load(checkpoint / "state.npz", allow_pickle=False) as arrays:
        assert {"state", "ledger.delta"} <= set(arrays.files)


class GradNorm(RoundHook):
    """A hook that works in autograd: its record, its message and its snapshot are tensors that require grad."""

    name = "grad_norm"

    @classmethod
    def sends(cls, config):
        return lambda t: True

    def after_local_step(self, t: int) -> None:
        params = self.block.population.params.detach().requires_grad_()
        (params.square().sum(dim=1) / 2).sum().backward()
        self.norm = params.grad.norm(dim=1, keepdim=True) * params[:, :1].detach().requires_grad_()  # in a graph

    def message(self, t: int, local: bool):
        return self.norm

    def after_gossip(self, t: int, inbox: Inbox):
        assert all(isinstance(m, np.ndarray) for m, ids in zip(inbox.messages, inbox.ids, strict=True)
                   if not np.array_equal(ids, self.block.nodes)), "another block's message arrives as numpy"
        return {"round": np.full(self.block.size, t, np.int32), "node": self.block.nodes.astype(np.int32),
                "norm": self.norm[:, 0]}

    def snapshot(self, t: int):
        return {"grad_norm.last": self.norm}


class GradNormTable(RowsDriver):
    name = "grad_norm"
    tables = {"grad_norm": pa.schema([("round", pa.int32()), ("node", pa.int32()), ("norm", pa.float32())])}


def test_a_hooks_tensors_reach_the_driver_the_others_and_the_checkpoint_as_arrays(ray_local, by_value,
                                                                                   tmp_path: Path) -> None:
    """Tensors a hook returns (here attached to an autograd graph: numpy() refuses them as they are) reach the
    driver's table, the other actors' inboxes and the checkpoint as numpy arrays."""
    method = Method("grad_norm", lambda config: True, GradNorm, GradNormTable)
    config = dice_ray.as_config(CONFIG, engine={"actors": 2},
                                output={"out": str(tmp_path / "g"), "keep_checkpoints": True})
    run = dice_ray.run(config, engine="ray", methods=[method])
    table = run.grad_norm
    assert len(table) == 9 * 6 and (table["norm"] != 0).all()
    [checkpoint] = sorted((run.path / "checkpoints").glob("round-*"))[-1:]
    with np.load(checkpoint / "state.npz", allow_pickle=False) as arrays:
        last = arrays["grad_norm.last"]
    saved = json.loads((checkpoint / "meta.json").read_text())["round"]
    assert last.shape == (9, 1) and last.dtype == np.float32
    np.testing.assert_array_equal(last[:, 0], table[table["round"] == saved].sort_values("node")["norm"].to_numpy())


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}  # toy_method is importable, as a user's module is
    return subprocess.run([sys.executable, "-m", "dice_ray.simulate", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)


@pytest.mark.slow  # ~20 s (six command lines); the default run keeps CI under 20 minutes
def test_a_method_takes_its_options_from_yaml_and_from_its_generated_flag(tmp_path: Path) -> None:
    """One file (tests/toy_method.py) adds a method with options: YAML sets them, a flag generated from the field
    overrides them, its cross-method check refuses bad input with one line, and its stage runs after training."""
    config = {**CONFIG, "imports": ["toy_method"], "scaled_norm": {"enabled": True, "scale": 2.0}}
    (tmp_path / "toy.yaml").write_text(json.dumps(config))  # JSON is YAML
    help_text = _cli(["--imports", "toy_method", "--help"], tmp_path).stdout
    assert "--scaled-norm-scale FLOAT" in help_text and "the factor applied to every norm" in help_text
    for out, extra in (("yaml", []), ("flag", ["--scaled-norm-scale", "6"])):
        done = _cli(["--config", "toy.yaml", "--engine", "local", "--out", out, *extra], tmp_path)
        assert done.returncode == 0, done.stderr
    yaml_run, flag_run = dice_ray.open_run(tmp_path / "yaml"), dice_ray.open_run(tmp_path / "flag")
    assert yaml_run.config.model_dump()["scaled_norm"] == {"enabled": True, "scale": 2.0}
    np.testing.assert_allclose(flag_run.scaled_norm["norm"], 3 * yaml_run.scaled_norm["norm"], rtol=1e-12)
    totals = yaml_run.scaled_norm.groupby("node")["norm"].sum().to_numpy()
    np.testing.assert_allclose(yaml_run.norm_totals["total"], totals, rtol=1e-12)
    bad = _cli(["--config", "toy.yaml", "--engine", "local", "--rounds", "1", "--out", "bad"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: config: scaled_norm needs at least 2 rounds"
    bad = _cli(["--config", "toy.yaml", "--scaled-norm-scale", "-1", "--out", "bad"], tmp_path)
    assert bad.returncode == 2 and "config: scaled_norm.scale: Input should be greater than 0" in bad.stderr
    off = _cli(["--imports", "toy_method", "--scaled-norm-scale", "2", "--engine", "local", "--out", "bad"], tmp_path)
    assert off.returncode == 2 and off.stderr.strip() == ("error: --scaled-norm-scale applies to scaled_norm, which "
                                                          "this run leaves off (scaled_norm.enabled, "
                                                          "--scaled-norm-enabled)")
    assert not (tmp_path / "bad").exists()


def test_a_methods_stage_gives_the_same_tables_on_the_local_and_the_ray_backend(ray_local, tmp_path: Path) -> None:
    import ray.cloudpickle
    import toy_method

    ray.cloudpickle.register_pickle_by_value(toy_method)  # Ray workers need not import it (a notebook's method)
    try:
        runs = [dice_ray.run(dice_ray.as_config(CONFIG, scaled_norm={"enabled": True, "scale": 0.5},
                                                engine={"actors": 2}, output={"out": str(tmp_path / engine)}),
                             engine=engine) for engine in ("local", "ray")]
    finally:
        ray.cloudpickle.unregister_pickle_by_value(toy_method)  # (conftest unregisters the method)
    for name in ("scaled_norm", "norm_totals"):
        pd.testing.assert_frame_equal(runs[1].table(name), runs[0].table(name), check_exact=False, rtol=1e-6)
    assert len(runs[0].norm_totals) == CONFIG["nodes"] and (runs[0].norm_totals["total"] > 0).all()


def test_a_method_the_ray_workers_cannot_import_stops_the_run_at_once(ray_local, tmp_path: Path) -> None:
    """Registered here but importable nowhere else (not on the workers' path, not pickled by value): the actors cannot
    be created, and the run says why instead of waiting out engine.restart_timeout."""
    import toy_method  # noqa: F401 (registers scaled_norm in this process only)

    config = dice_ray.as_config(CONFIG, scaled_norm={"enabled": True}, engine={"actors": 1},
                                output={"out": str(tmp_path / "r")})
    with pytest.raises(RuntimeError, match=r"actor 0 cannot start: ModuleNotFoundError: No module named 'toy_method'"):
        dice_ray.run(config, engine="ray")


def _interrupted(config: dict, out: Path, methods: tuple = ()) -> Path:
    """A local run of ``config`` in ``out`` stopped after round 4 (its checkpoint: round 3), as Ctrl-C stops it."""
    def stop(metrics, engine) -> None:
        if metrics.round == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dice_ray.run(dice_ray.as_config(config, output={**config["output"], "out": str(out)}), engine="local",
                     on_round=stop, methods=methods)
    return out


def test_a_script_run_that_registered_a_method_it_left_off_resumes_from_the_command_line(tmp_path: Path) -> None:
    """Registering a method with options adds its section to every config this process builds; a run that does not
    use it does not record it, so the command line (which never imported the method) can continue the run."""
    import toy_method  # noqa: F401 (registers scaled_norm, off by default)

    run = _interrupted(CONFIG, tmp_path / "run")
    assert "scaled_norm" not in json.loads((run / "manifest.json").read_text())["config"]
    done = subprocess.run([sys.executable, "-m", "dice_ray.simulate", "--resume", str(run), "--engine", "local"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # toy_method not importable
    assert done.returncode == 0, done.stderr
    reference = dice_ray.run(dice_ray.as_config(CONFIG, output={**CONFIG["output"], "out": str(tmp_path / "ref")}),
                             engine="local")
    pd.testing.assert_frame_equal(dice_ray.open_run(run).rounds, reference.rounds)


def test_a_run_that_used_a_method_resumes_only_with_it_and_says_how(tmp_path: Path) -> None:
    """A registered method the run used: the command line, which cannot import it, refuses in one line (exit 2)
    and says how to continue; Python continues it once the method is registered. A method passed as ``methods=``
    and left out on resume is refused before anything changes, instead of a 'complete' run without its table."""
    import toy_method  # noqa: F401

    config = {**CONFIG, "scaled_norm": {"enabled": True, "scale": 2.0}}
    run = _interrupted(config, tmp_path / "run", methods=(UPDATE_NORM_METHOD,))
    opened = dice_ray.open_run(run)  # a method's rows, committed when the run stopped, read as the built-in ones do
    assert {"rounds", "update_norm"} <= set(opened.tables()) and opened.update_norm["round"].max() == 4
    before = (run / "manifest.json").read_bytes()
    done = subprocess.run([sys.executable, "-m", "dice_ray.simulate", "--resume", str(run)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: cannot resume {str(run)!r}: it used the method 'scaled_norm', which neither this process nor a module "
        "its config imports registers; continue it from Python after importing the module that registers it "
        "(dice_ray.resume)")
    with pytest.raises(dice_ray.InputError, match=r"it used the method 'update_norm'; pass it again"):
        dice_ray.resume(run, engine="local")
    assert (run / "manifest.json").read_bytes() == before
    resumed = dice_ray.resume(run, engine="local", methods=(UPDATE_NORM_METHOD,))
    reference = dice_ray.run(dice_ray.as_config(config, output={**CONFIG["output"], "out": str(tmp_path / "ref")}),
                             engine="local", methods=(UPDATE_NORM_METHOD,))
    for name in ("rounds", "scaled_norm", "update_norm"):
        pd.testing.assert_frame_equal(resumed.table(name), reference.table(name))


class Boom(RoundHook):
    name = "boom"

    def after_gossip(self, t: int, inbox: Inbox) -> dict:
        if t == 1:
            raise RuntimeError("boom")
        return {}


def test_a_hook_that_raises_is_named_in_its_traceback(tmp_path: Path) -> None:
    """A hook's own bug keeps its traceback (it is not an input error), with a note naming the hook, the call and the
    round."""
    config = dice_ray.as_config(CONFIG, output={"out": str(tmp_path / "x")})
    with pytest.raises(RuntimeError, match="^boom") as err:
        dice_ray.run(config, engine="local", methods=[Method("boom", lambda c: True, Boom)])
    assert "(raised in hook 'boom''s after_gossip of round 1)" in (err.value.__notes__ or [])
