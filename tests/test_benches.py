"""The benches in bench/ keep working as the package changes: every script answers --help, and the benches whose
run configs the package's validation once started refusing build their studies and run their quick mode."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))

# Runs every script's --help in one interpreter (torch and Ray are imported once), each as ``python bench/<name>``.
HELP_ALL = """
import contextlib, io, runpy, sys
failed = []
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(name, run_name="__main__")
        failed.append(f"{name}: --help returned without exiting")
    except SystemExit as done:
        if done.code not in (0, None) or "usage:" not in out.getvalue():
            failed.append(f"{name}: exit {done.code}")
print("\\n".join(failed) or "ok")
"""


def test_every_bench_script_answers_help():
    done = subprocess.run([sys.executable, "-c", HELP_ALL, *SCRIPTS], cwd=BENCH, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok", done.stdout


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_bench_studies_build_and_replays_alone_drops_only_the_estimates(bench_path):
    import bench_dice
    import bench_replays_gpu

    study = bench_replays_gpu.study(True, False, 0.0)
    alone = bench_replays_gpu.study(True, True, 0.0)
    assert list(study.config.influence.variants) == ["first-order", "curvature"]
    assert list(alone.config.influence.variants) == [] and alone.config.influence.ground_truth
    assert alone.config.model_dump(exclude={"influence"}) == study.config.model_dump(exclude={"influence"})
    assert bench_dice.experiment_for(16, 12, 3).config.influence.enabled


@pytest.mark.slow  # ~50 s here: two benches' quick modes, each with a local Ray
@pytest.mark.parametrize("command", [["bench_dice.py", "--quick"],
                                     ["bench_replays_gpu.py", "--quick", "--gt-only", "--repeats", "1"]])
def test_bench_quick_modes_run(command, tmp_path):
    done = subprocess.run([sys.executable, *command], cwd=BENCH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "replays/s" in done.stdout or "cpu tasks" in done.stdout, done.stdout
    if command[0] == "bench_dice.py":  # (e), the replay against its floor
        assert "ms a probe, floor" in done.stdout, done.stdout


def _declared_options(script: Path) -> set[str]:
    import re

    return set(re.findall(r"add_argument\(\s*[\"'](--[a-z][a-z0-9-]*)[\"']", script.read_text()))


def test_every_bench_command_in_the_docs_uses_options_its_script_declares():
    """A command line ``python bench/X.py --opt`` anywhere in the docs, bench/README.md or a bench's own docstring names
    only options X declares (the docs pages' check pools every script's options; this one is per script)."""
    import re

    texts = [ROOT / "README.md", BENCH / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted(BENCH.glob("*.py"))]
    declared = {path.name: _declared_options(path) for path in BENCH.glob("*.py")}
    problems, seen = [], 0
    for path in texts:
        text = path.read_text().replace("\\\n", " ")  # shell line continuations
        for line in text.splitlines():
            for script, rest in re.findall(r"python (?:\S*/)?bench/([a-z_]+\.py)([^`#\n]*)", line):
                seen += 1
                if script not in declared:
                    problems.append(f"{path.relative_to(ROOT)}: {script} does not exist")
                    continue
                flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest))
                problems += [f"{path.relative_to(ROOT)}: {script} {f}" for f in sorted(flags - declared[script])]
    assert seen > 50  # the pattern still finds the commands
    assert problems == []
