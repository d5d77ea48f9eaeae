"""The tutorial notebook (docs/tutorial.ipynb) runs top to bottom: executed with nbclient, as a reader runs it.

Its last cells assert what it shows (label flippers detected), so a notebook that runs but shows the wrong
thing fails too. The committed copy keeps its outputs for the docs site (rendered without re-executing)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"


def test_tutorial_notebook_executes(tmp_path: Path):
    """Run where Jupyter runs it: with the notebook's folder (docs/) as the working directory. Its run directories
    (a ``tempfile.mkdtemp``, as a reader's are) go under the test's own folder, not a new one in /tmp per run."""
    import nbclient
    import nbformat
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env={**os.environ, "TMPDIR": str(tmp_path)})  # raises CellExecutionError naming the failing cell
    assert list(tmp_path.glob("dice-ray-tutorial-*/alignment/manifest.json"))
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the plots are inline
    printed = "".join(str(o) for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "IProgress" not in printed and "Missing packages" not in printed  # the notebook extra's ipywidgets


def test_committed_notebook_has_its_plots():
    """The site renders the committed outputs (mkdocs-jupyter, execute: false): they must be there."""
    import nbformat
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    codes = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in codes), "run the notebook and save it with its outputs"
    assert not [o for c in codes for o in c.get("outputs", []) if o.get("output_type") == "error"]
