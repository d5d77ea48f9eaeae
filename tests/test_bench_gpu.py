"""bench/bench_gpu.py runs on a machine without CUDA: it skips the CUDA parts, runs its CPU sanity part, exits 0."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 60-150 s here (two CNN runs on Ray actors): a bench's smoke test, in `-m slow`
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the bench runs its GPU parts (minutes)")
def test_bench_gpu_quick_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skipped = [line for line in done.stdout.splitlines() if line.endswith("skipped: no CUDA device")]
    assert any(line.startswith("(a) equivalence") for line in skipped), done.stdout
    assert any(line.startswith("(b) round time") for line in skipped), done.stdout
    assert "run twice: tables identical" in done.stdout, done.stdout
    assert out.is_file() and '"ok": true' in out.read_text()


@pytest.mark.slow  # ~35-60 s here: the rehearsal of (a), in `-m slow`
@pytest.mark.skipif(torch.cuda.is_available(), reason="--dry-run is the rehearsal for a machine without CUDA")
def test_bench_gpu_dry_run_of_the_equivalence_part_measures_the_cpus_own_spread(tmp_path):
    """The rehearsal walks (a) on the CPU, the CPU's own spread included: a subprocess with ATen's portable kernels,
    whose difference from the vectorized ones is float32 rounding (well under 1e-5) on the MLP."""
    import json

    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--dry-run", "--no-resnet18",
                           "--nodes", "16", "--parts", "a", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mlp = next(r for r in json.loads(out.read_text())["equivalence"] if r["model"] == "mlp")
    assert mlp["within_tolerance"] and mlp["within_cpu_spread"]
    assert 0 <= mlp["cpu_spread"] < 1e-5, mlp
    assert "CPU spread (vectorized vs portable ATen kernels" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="--dry-run is the rehearsal for a machine without CUDA")
def test_bench_gpu_dry_run_of_the_timed_runs_keeps_where_each_ran_when_stopped_at_its_budget(tmp_path):
    """(b) stops a slow run at its time budget, before the run's manifest records the placement: the rows still say
    where the actors ran, how they exchanged and whether the CUDA graph ran (asked of the actors at the stop), and
    the JSON carries (d)'s memory summary."""
    import json

    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--dry-run", "--no-resnet18",
                           "--nodes", "16", "--parts", "b", "--fractions", "0.5", "--modes", "none",
                           "--target-s", "0.05", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = results["timing"]
    assert any(r["stopped_early"] for r in rows)  # 0.1 s of rounds: the CNN's (0.1 s each on the CPU) outlast it
    for row in rows:
        assert row["devices"] == ["cpu"] and row["cuda_graph"] == ["None"], row
        assert row["transports"] == (["object_store"] if row["gpus_per_actor"] < 1 else ["one actor"]), row
    assert "memory" in results and "sanity" not in results  # (s) runs only when asked for, or without CUDA
