"""Result tables: schemas documented once (and in the docs' generated reference), written atomically."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dice_ray.results import NODES, ROUNDS, TableWriter, describe_tables, write_json_atomic, write_table_atomic

ROOT = Path(__file__).resolve().parents[2]


def test_docs_reference_documents_every_table_column() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.clean(describe_tables()) in gen.tables_markdown()  # docs/reference/tables.md, generated at build time


def test_every_column_has_a_description() -> None:
    for schema in (ROUNDS, NODES):
        assert all(f.metadata and f.metadata[b"description"].strip() for f in schema)


def test_table_writer_publishes_only_on_close(tmp_path: Path) -> None:
    path = tmp_path / "rounds.parquet"
    rows = {name: [None] * 2 for name in ROUNDS.names} | {"round": [0, 0], "node": [0, 1], "train_loss": [1.0, 2.0]}
    writer = TableWriter(path, ROUNDS)
    writer.write(rows)
    assert not path.exists()
    writer.close()
    table = pq.read_table(path)
    assert table.num_rows == 2 and table.column("train_loss").to_pylist() == [1.0, 2.0]
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.parquet"]


def test_table_writer_removes_its_partial_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "rounds.parquet"
    with pytest.raises(RuntimeError), TableWriter(path, ROUNDS):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writers_replace_whole_files(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "m.json", {"a": 1})
    write_json_atomic(tmp_path / "m.json", {"a": 2})
    assert (tmp_path / "m.json").read_text().strip() == '{\n  "a": 2\n}'
    cols = {"node": [0], "n_train": [5], "n_val": [1], "q": [1.0], "in_degree": [0], "self_weight": [1.0],
            "actor": [0], "misbehaving": [False]}
    write_table_atomic(tmp_path / "nodes.parquet", cols, NODES)
    assert pq.read_table(tmp_path / "nodes.parquet").to_pydict() == cols
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "nodes.parquet"]


def test_a_write_that_fails_midway_leaves_the_previous_file(tmp_path: Path) -> None:
    """``write_atomic`` (states.npy, the report and sweep PNGs): half a file is never published."""
    import numpy as np
    import pytest

    from dice_ray.results import write_atomic

    def npy(values):
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, values)
        return write

    write_atomic(tmp_path / "states.npy", npy(np.arange(4.0)))

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"\x93NUMPY half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "states.npy", broken)
    np.testing.assert_array_equal(np.load(tmp_path / "states.npy", allow_pickle=False), np.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["states.npy"]
