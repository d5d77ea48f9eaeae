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
