"""The round-hook seam: a new method defined here, in one place, runs on every engine with the same numbers;
no private name crosses modules."""

from __future__ import annotations

import ast
import json
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
        return self.delta if local else self.delta.numpy()

    def after_gossip(self, t: int, inbox: Inbox):
        mixed = sum(torch.as_tensor(w.toarray()) @ torch.as_tensor(m)
                    for w, m in zip(inbox.weights, inbox.messages, strict=True))
        return {"round": np.full(self.block.size, t, np.int32), "node": self.block.nodes.astype(np.int32),
                "norm": self.delta.norm(dim=1).numpy(), "mixed_norm": mixed.norm(dim=1).numpy()}


class UpdateNormTable(RowsDriver):
    name = "update_norm"
    tables = {"update_norm": UPDATE_NORM}


UPDATE_NORM_METHOD = Method("update_norm", lambda config: True, UpdateNorm, UpdateNormTable)
CONFIG = {"nodes": 9, "rounds": 6, "seed": 2, "data": {"dataset": "digits", "heldout_size": 64},
          "proximal": {"enabled": True, "zprime": "heldout"},
          "output": {"progress": False, "eval_every": 3, "checkpoint_every": 4}}


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
    clash = Method("proximal", lambda config: True, UpdateNorm, UpdateNormTable)
    config = dice_ray.as_config(CONFIG, output={"out": str(tmp_path / "x")})
    with pytest.raises(dice_ray.InputError, match="used twice"):
        dice_ray.run(config, engine="local", methods=[clash])


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
