"""Tests of dice_ray.core.topology: graphs, weight rules, validation, files and time-varying W^t (concepts §1)."""

from __future__ import annotations

import re
import time

import networkx as nx
import numpy as np
import pytest
from scipy import sparse

from dice_ray.core.topology import (
    TOPOLOGIES,
    WEIGHT_RULES,
    Topology,
    complete_graph,
    erdos_renyi_graph,
    exponential_graph,
    grid_graph,
    is_strongly_connected,
    load_edge_list,
    load_mixing_matrix,
    make_topology,
    metropolis_weights,
    ring_graph,
    star_graph,
    torus_graph,
    uniform_weights,
    validate_mixing_matrix,
)
from dice_ray.errors import InputError

SIZES = (2, 5, 16, 17, 64)
STATIC = [name for name in TOPOLOGIES if name not in ("file", "one-peer-exponential", "random-matching")]
GENERATORS = {"ring": ring_graph, "exponential": exponential_graph, "grid": grid_graph, "torus": torus_graph,
              "star": star_graph, "complete": complete_graph,
              "erdos-renyi": lambda n: erdos_renyi_graph(n, min(1.0, 2 * np.log(n) / n), 0)}


def dense(matrix: sparse.csr_array) -> np.ndarray:
    return matrix.toarray()


def nx_adjacency(graph: nx.Graph, nodelist: list) -> np.ndarray:
    # networkx's A[i, j] = 1 for i -> j; ours is A[k, l] = 1 for l -> k, so transpose.
    return nx.to_numpy_array(graph, nodelist=nodelist).T


def assert_mixing_properties(w: sparse.csr_array, n: int) -> None:
    assert isinstance(w, sparse.csr_array) and w.dtype == np.float64 and w.shape == (n, n)
    assert w.has_sorted_indices
    assert np.count_nonzero(w.tocoo().row == w.tocoo().col) == n  # diagonal stored explicitly
    assert np.all(w.data >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


# -------------------------------------------------------------------------------------- static topologies

@pytest.mark.parametrize("weights", WEIGHT_RULES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", STATIC)
def test_static_topologies_are_valid_mixing_matrices_on_their_graph(name, n, weights):
    topology = make_topology(name, n, weights=weights)
    w = topology.mixing_matrix(0)
    assert_mixing_properties(w, n)
    assert is_strongly_connected(w)
    graph = dense(GENERATORS[name](n))
    assert np.all(np.diag(graph) == 0)
    # support exactly on edges l -> k and the diagonal
    np.testing.assert_array_equal(dense(w) > 0, (graph + np.eye(n)) > 0)
    np.testing.assert_array_equal(dense(topology.adjacency()), graph)
    assert topology.mixing_matrix(5) is w  # static: one cached object


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", ["ring", "grid", "torus", "star", "complete", "erdos-renyi"])
def test_metropolis_on_undirected_graphs_is_symmetric_and_doubly_stochastic(name, n):
    w = dense(make_topology(name, n, weights="metropolis").mixing_matrix(0))
    np.testing.assert_allclose(w, w.T, atol=1e-15)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)


def test_uniform_weights_are_one_over_closed_in_degree_on_a_directed_graph():
    a = exponential_graph(6)  # in-degree 3 (offsets 1, 2, 4)
    w = dense(uniform_weights(a))
    np.testing.assert_allclose(w[(dense(a) + np.eye(6)) > 0], 1 / 4)
    assert not np.allclose(w, w.T)  # directed: row-stochastic only


@pytest.mark.parametrize("n", [16, 17])
def test_generators_match_networkx(n):
    nodes = list(range(n))
    np.testing.assert_array_equal(dense(ring_graph(n)), nx_adjacency(nx.cycle_graph(n), nodes))
    np.testing.assert_array_equal(dense(star_graph(n)), nx_adjacency(nx.star_graph(n - 1), nodes))
    np.testing.assert_array_equal(dense(complete_graph(n)), nx_adjacency(nx.complete_graph(n), nodes))
    rows = 4 if n == 16 else 1
    cells = [(r, c) for r in range(rows) for c in range(n // rows)]
    grid = nx.grid_2d_graph(rows, n // rows)
    np.testing.assert_array_equal(dense(grid_graph(n)), nx_adjacency(grid, cells))
    if rows > 2:
        torus = nx.grid_2d_graph(rows, n // rows, periodic=True)
        np.testing.assert_array_equal(dense(torus_graph(n)), nx_adjacency(torus, cells))


def test_exponential_graph_is_directed_with_power_of_two_offsets():
    a = dense(exponential_graph(16))
    for k in range(16):
        assert sorted(np.flatnonzero(a[k])) == sorted((k - o) % 16 for o in (1, 2, 4, 8))
    assert not np.array_equal(a, a.T)


def test_grid_and_torus_shapes():
    assert grid_graph(12).sum() == 2 * (3 * 3 + 2 * 4)  # 3 x 4 grid: 17 undirected edges
    assert grid_graph(12, rows=2).sum() == 2 * (2 * 5 + 6)  # 2 x 6 grid: 16 undirected edges
    assert grid_graph(7).sum() == 2 * 6  # prime n: a 1 x 7 path
    assert torus_graph(7).sum() == 2 * 7  # 1 x 7 torus: a cycle, no self-loops
    assert torus_graph(8, rows=2).sum() == 2 * (2 * 4 + 4)  # 2 x 4: the length-2 side adds no duplicate
    assert torus_graph(4, rows=2).sum() == 2 * 4  # 2 x 2 torus is a 4-cycle


def test_erdos_renyi_is_deterministic_undirected_and_connected():
    a = erdos_renyi_graph(40, 0.1, seed=3)
    np.testing.assert_array_equal(dense(a), dense(erdos_renyi_graph(40, 0.1, seed=3)))
    assert (a != erdos_renyi_graph(40, 0.1, seed=4)).nnz > 0
    np.testing.assert_array_equal(dense(a), dense(a).T)
    assert is_strongly_connected(a)
    np.testing.assert_array_equal(dense(erdos_renyi_graph(6, 1.0, seed=0)), dense(complete_graph(6)))


def test_paper_values():
    ring = dense(make_topology("ring", 16).mixing_matrix(0))
    np.testing.assert_allclose(ring[ring > 0], 1 / 3)
    exponential = make_topology("exponential", 16)
    w = dense(exponential.mixing_matrix(0))
    np.testing.assert_allclose(w[w > 0], 1 / 5)
    assert exponential.describe()["min_in_degree"] == exponential.describe()["max_in_degree"] == 4
    grid = dense(make_topology("grid", 16, weights="metropolis").mixing_matrix(0))  # 4 x 4
    assert grid[0, 0] == pytest.approx(0.5)  # corner: degree 2, neighbours of degree 3 -> 1/4 each
    interior = 5  # (1, 1): degree 4
    assert grid[interior, interior] == pytest.approx(0.2)
    np.testing.assert_allclose(grid[interior, [1, 4, 6, 9]], 0.2)


def test_star_metropolis_values():
    w = dense(make_topology("star", 5, weights="metropolis").mixing_matrix(0))
    np.testing.assert_allclose(w[0], 0.2)  # hub: 1/(1+4) to each leaf and itself
    np.testing.assert_allclose(w[1, [0, 1]], [0.2, 0.8])


def test_topology_helpers():
    ring = make_topology("ring", 8)
    np.testing.assert_array_equal(ring.in_neighbors(0, 0), [1, 7])
    graph = ring.to_networkx()
    assert graph.number_of_edges() == 16 and nx.is_strongly_connected(graph)
    assert graph[7][0]["weight"] == pytest.approx(1 / 3)
    assert graph.nodes[0]["self_weight"] == pytest.approx(1 / 3)
    description = make_topology("exponential", 16).describe()
    assert description == {"name": "exponential", "n": 16, "time_varying": False, "period": 1,
                           "weights": "uniform", "edges": 64, "min_in_degree": 4, "max_in_degree": 4}
    directed = make_topology("exponential", 8).to_networkx()
    assert directed.has_edge(0, 1) and not directed.has_edge(1, 0)  # 0 sends to 1


# ------------------------------------------------------------------------------------------ hop distances

def test_hop_distances_static():
    np.testing.assert_array_equal(make_topology("ring", 8).hop_distances(0), [0, 1, 2, 3, 4, 3, 2, 1])
    exponential = make_topology("exponential", 16).hop_distances(0)
    # offsets 1, 2, 4, 8 only go forward: hops to k is popcount(k)
    np.testing.assert_array_equal(exponential, [bin(k).count("1") for k in range(16)])
    assert exponential.max() == 4
    np.testing.assert_array_equal(make_topology("ring", 8).hop_distances(0, max_hops=2),
                                  [0, 1, 2, -1, -1, -1, 2, 1])
    star = make_topology("star", 6)
    np.testing.assert_array_equal(star.hop_distances(3), [1, 2, 2, 0, 2, 2])


@pytest.mark.parametrize("name", ["one-peer-exponential", "random-matching"])
def test_hop_distances_match_the_support_of_products_of_mixing_matrices(name):
    """concepts §3: k is first reached at step s iff (W^{t+s-1} ... W^t)[k, j] > 0 for the first time."""
    topology, n, t, j = make_topology(name, 12, seed=7), 12, 3, 5
    expected = np.full(n, -1)
    expected[j] = 0
    product = np.eye(n)
    for s in range(1, 60):
        product = dense(topology.mixing_matrix(t + s - 1)) @ product
        expected[(expected < 0) & (product[:, j] > 0)] = s
    np.testing.assert_array_equal(topology.hop_distances(j, t), expected)


def test_one_peer_exponential_hop_distances():
    # rounds use offsets 1, 2, 4, 8: after s rounds the source reaches every k < 2^s
    hops = make_topology("one-peer-exponential", 16).hop_distances(0)
    np.testing.assert_array_equal(hops, [k.bit_length() for k in range(16)])


# --------------------------------------------------------------------------------------------- time-varying

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", ["one-peer-exponential", "random-matching"])
def test_time_varying_topologies(name, n):
    topology = make_topology(name, n, seed=11)
    assert topology.time_varying
    union = sparse.csr_array((n, n))
    for t in range(topology.period):
        w = topology.mixing_matrix(t)
        assert_mixing_properties(w, n)
        np.testing.assert_array_equal(dense(w), dense(topology.mixing_matrix(t)))  # repeated calls
        np.testing.assert_array_equal(dense(w), dense(make_topology(name, n, seed=11).mixing_matrix(t)))
        union = union + w
    assert is_strongly_connected(union)
    if n > 2:
        assert any((topology.mixing_matrix(0) != topology.mixing_matrix(t)).nnz for t in range(1, 4))


def test_one_peer_exponential_values():
    topology = make_topology("one-peer-exponential", 16, weights="metropolis")  # weight rule is ignored
    assert topology.period == 4
    for t, offset in enumerate([1, 2, 4, 8, 1]):
        w = dense(topology.mixing_matrix(t))
        for k in range(16):
            np.testing.assert_array_equal(np.flatnonzero(w[k]), sorted([k, (k - offset) % 16]))
            np.testing.assert_allclose(w[k, [k, (k - offset) % 16]], 0.5)


@pytest.mark.parametrize("n", [8, 9])
def test_random_matching_is_a_matching(n):
    topology = make_topology("random-matching", n, seed=2)
    for t in range(5):
        w = dense(topology.mixing_matrix(t))
        np.testing.assert_array_equal(w, w.T)
        partners = np.count_nonzero(w - np.diag(np.diag(w)), axis=1)
        assert np.all(partners <= 1) and np.count_nonzero(partners == 0) == n % 2
        np.testing.assert_allclose(np.diag(w), np.where(partners == 1, 0.5, 1.0))
    other_seed = make_topology("random-matching", n, seed=3)
    assert any((topology.mixing_matrix(t) != other_seed.mixing_matrix(t)).nnz for t in range(3))


# ---------------------------------------------------------------------------------------------------- files

def test_file_topologies(tmp_path):
    edges = tmp_path / "ring.txt"
    lines = [f"{k},{(k + 1) % 6}" for k in range(5)]
    edges.write_text("# a ring of 6\n" + "\n".join(lines) + "\n5 0  # wrap\n\n")
    np.testing.assert_array_equal(dense(load_edge_list(edges)), dense(ring_graph(6)))
    from_edges = make_topology("file", 6, path=str(edges), weights="metropolis")
    np.testing.assert_array_equal(dense(from_edges.mixing_matrix(0)),
                                  dense(make_topology("ring", 6, weights="metropolis").mixing_matrix(0)))
    directed = load_edge_list(edges, directed=True)
    assert directed[1, 0] == 1 and directed[0, 1] == 0  # "0 1" is the edge 0 -> 1: A[1, 0] = 1
    assert load_edge_list(edges, n=8).shape == (8, 8)
    with pytest.raises(InputError, match=r"names participants 0\.\.5, but the run has 8 \(nodes, --nodes\): "
                                         r"participants 6\.\.7 would have no edge"):
        make_topology("file", 8, path=str(edges))  # it said "not strongly connected: 3 components"
    with pytest.raises(InputError, match=r"but the run has 7 \(nodes, --nodes\): participant 6 would have no edge"):
        make_topology("file", 7, path=str(edges))  # (it said "participants 6..6")
    exported = tmp_path / "exported.csv"  # pandas' to_csv with its header; networkx's write_edgelist with {}
    exported.write_text("src,dst\n" + "\n".join(f"{k},{(k + 1) % 6}" for k in range(6)) + "\n")
    networkx_edges = tmp_path / "networkx.txt"
    networkx_edges.write_text("".join(f"{k} {(k + 1) % 6} {{}}\n" for k in range(6)))
    for path in (exported, networkx_edges):
        np.testing.assert_array_equal(dense(load_edge_list(path)), dense(ring_graph(6)))
    loops = tmp_path / "loops.txt"  # self-loops only: one line (it was numpy's zero-size error)
    loops.write_text("0 0\n1 1\n")
    with pytest.raises(InputError):
        make_topology("file", 2, path=str(loops))
    two_headers = tmp_path / "two.csv"  # only the first line with content may be a header
    two_headers.write_text("src,dst\nfrom,to\n0,1\n")
    with pytest.raises(InputError, match="line 2: node ids must be integers"):
        load_edge_list(two_headers)

    w = dense(make_topology("exponential", 8).mixing_matrix(0))
    np.save(tmp_path / "w.npy", w)
    sparse.save_npz(tmp_path / "w.npz", sparse.csr_array(w))
    np.savetxt(tmp_path / "w.csv", w, delimiter=",")
    np.savetxt(tmp_path / "w.txt", w)
    for suffix in ("npy", "npz", "csv", "txt"):
        np.testing.assert_allclose(dense(load_mixing_matrix(tmp_path / f"w.{suffix}")), w)
    topology = make_topology("file", 8, path=str(tmp_path / "w.npz"))
    np.testing.assert_allclose(dense(topology.mixing_matrix(0)), w)
    assert topology.weights == "fixed"


def test_loaded_matrix_without_self_weights_still_stores_its_diagonal(tmp_path):
    cycle = np.roll(np.eye(3), 1, axis=1)  # a directed 3-cycle: valid, zero diagonal
    np.save(tmp_path / "cycle.npy", cycle)
    w = load_mixing_matrix(tmp_path / "cycle.npy")
    assert w.nnz == 6 and np.all(w.diagonal() == 0)
    np.testing.assert_array_equal(make_topology("file", 3, path=str(tmp_path / "cycle.npy")).hop_distances(0),
                                  [0, 2, 1])


# --------------------------------------------------------------------------------------------------- errors

def two_blocks() -> np.ndarray:
    return np.kron(np.eye(2), np.full((2, 2), 0.5))


@pytest.mark.parametrize(("matrix", "message"), [
    (two_blocks(), "2 strongly connected components"),
    (np.array([[0.5, 0.5, 0], [0.5, 0.5, 0], [0.3, 0.3, 0.3]]), "row 2 sums to 0.9"),
    (np.array([[1.5, -0.5], [0.5, 0.5]]), "W[0, 1] = -0.5 is negative"),
    (np.full((2, 3), 1 / 3), "shape (2, 3)"),
    (np.array([[np.nan, 1.0], [0.5, 0.5]]), "NaN"),
])
def test_validate_mixing_matrix_rejects(matrix, message):
    for candidate in (matrix, sparse.csr_array(matrix)):
        with pytest.raises(InputError, match=re.escape(message)):
            validate_mixing_matrix(candidate)


def test_validate_mixing_matrix_accepts_and_strong_connectivity():
    validate_mixing_matrix(np.full((3, 3), 1 / 3))
    assert not is_strongly_connected(np.array([[1.0, 0.0], [0.5, 0.5]]))  # 0 -> 1 only
    assert is_strongly_connected(np.array([[0.5, 0.5], [0.5, 0.5]]))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "rin", "n": 8}, "topology 'rin' is unknown; choose one of ring, exponential"),
    ({"name": "ring", "n": 1}, "n=1"),
    ({"name": "ring", "n": 4.0}, "n=4.0"),
    ({"name": "ring", "n": 8, "weights": "max"}, "weights 'max' is unknown; choose one of uniform, metro"),
    ({"name": "grid", "n": 12, "rows": 5}, "rows=5 does not divide n=12"),
    ({"name": "erdos-renyi", "n": 8, "p": 0.0}, "p=0.0"),
    ({"name": "erdos-renyi", "n": 8, "p": 1.5}, "p=1.5"),
    ({"name": "erdos-renyi", "n": 50, "p": 0.001}, "never connected"),
    ({"name": "random-matching", "n": 8, "seed": -1}, "seed=-1"),
    ({"name": "file", "n": 8}, "path="),
    ({"name": "file", "n": 8, "path": "/nonexistent/w.npy"}, "does not exist"),
    ({"name": "file", "n": 8, "path": "/nonexistent/edges.txt"}, "does not exist"),
])
def test_make_topology_errors(kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)) as info:
        make_topology(**kwargs)
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path):
    def write_npy(name: str, matrix: np.ndarray) -> str:
        np.save(tmp_path / name, matrix)
        return str(tmp_path / name)

    cases = [
        (write_npy("blocks.npy", two_blocks()), 4, "strongly connected"),
        (write_npy("rows.npy", np.array([[0.5, 0.5, 0], [0.5, 0.5, 0], [0.3, 0.3, 0.3]])), 3, "row 2 sums"),
        (write_npy("negative.npy", np.array([[1.5, -0.5], [0.5, 0.5]])), 2, "negative"),
        (write_npy("wide.npy", np.full((2, 3), 1 / 3)), 2, "square"),
        (write_npy("small.npy", np.full((3, 3), 1 / 3)), 4, "n=4 does not match"),
    ]
    (tmp_path / "bad_id.txt").write_text("0 1\n1 2\n2 9\n")
    (tmp_path / "word.txt").write_text("0 1\n1 x\n")
    (tmp_path / "three.txt").write_text("0 1 2\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "garbage.csv").write_text("0.5,0.5\nhello,1\n")
    cases += [
        (str(tmp_path / "bad_id.txt"), 4, "line 3: node ids must be in 0..3"),
        (str(tmp_path / "word.txt"), 4, "line 2: node ids must be integers"),
        (str(tmp_path / "three.txt"), 4, "line 1: expected 'src dst'"),
        (str(tmp_path / "empty.txt"), 4, "no edges"),
    ]
    for path, n, message in cases:
        with pytest.raises(InputError, match=message) as info:
            make_topology("file", n, path=path)
        assert "\n" not in str(info.value) and (path in str(info.value) or "n=4" in message)
    with pytest.raises(InputError, match="could not be read"):
        load_mixing_matrix(tmp_path / "garbage.csv")
    (tmp_path / "w.json").write_text("{}")
    with pytest.raises(InputError, match="suffix '.json'"):
        load_mixing_matrix(tmp_path / "w.json")
    with pytest.raises(InputError, match="does not exist"):
        load_edge_list(tmp_path / "missing.txt")


def test_files_an_audit_found_misread(tmp_path):
    """A complex W ran with its imaginary part dropped (a ComplexWarning the only sign); an empty .npy and an edge
    list of binary bytes were tracebacks; a byte-order mark (a spreadsheet's CSV) read as part of the first node id."""
    ring = make_topology("ring", 4).mixing_matrix(0).toarray()
    np.save(tmp_path / "complex.npy", ring + 1j)
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    for name, message in (("complex.npy", "holds complex128 values; W is real numbers"),
                          ("empty.npy", "could not be read"), ("binary.txt", "is not text (UTF-8)")):
        with pytest.raises(InputError, match=re.escape(message)):
            make_topology("file", 4, path=tmp_path / name)
    (tmp_path / "bom.csv").write_text("\ufeff0,1\n1,2\n2,3\n3,0\n", encoding="utf-8")
    assert make_topology("file", 4, path=tmp_path / "bom.csv").mixing_matrix(0).nnz == 12


def test_topology_rejects_bad_queries_and_invalid_time_varying_sequences():
    ring = make_topology("ring", 4)
    with pytest.raises(InputError, match="k=4 is out of range"):
        ring.in_neighbors(4, 0)
    with pytest.raises(InputError, match="t=-1"):
        ring.mixing_matrix(-1)
    identity = lambda t: sparse.csr_array(sparse.eye_array(4))
    with pytest.raises(InputError, match="not strongly connected"):
        Topology("stuck", 4, identity, period=3)
    with pytest.raises(InputError, match="row 0 sums to 2"):
        Topology("heavy", 4, lambda t: sparse.csr_array(2 * sparse.eye_array(4)), period=1)
    with pytest.raises(InputError, match="2 strongly connected components"):
        Topology("blocks", 4, uniform_weights(np.kron(np.eye(2), np.ones((2, 2)))))
    assert metropolis_weights(np.zeros((2, 2))).nnz == 2  # no edges: identity


# ---------------------------------------------------------------------------------------------------- scale

@pytest.mark.parametrize("name", ["exponential", "erdos-renyi", "ring", "torus", "random-matching"])
def test_large_topologies_are_sparse_and_fast(name):
    start = time.perf_counter()
    topology = make_topology(name, 1000, weights="metropolis")
    elapsed = time.perf_counter() - start
    w = topology.mixing_matrix(0)
    assert sparse.issparse(w) and w.nnz < 0.05 * 1000**2
    assert elapsed < 1.0
    assert topology.hop_distances(0).min() == 0 and np.all(topology.hop_distances(0) >= 0)
