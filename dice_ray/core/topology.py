"""Communication graphs and mixing matrices W^t (concepts §1).

Gossip step: theta_k^{t+1} = sum_l W^t[k, l] theta_l^{t+1/2}. Row k of W holds the weights participant k gives
to its in-neighbours l (edge l -> k) and to itself, so W is row-stochastic. Adjacency matrices use the same
orientation: A[k, l] = 1 iff l -> k (k receives from l), no self-loops.

Every matrix here is a ``scipy.sparse.csr_array`` (float64, N x N, sorted indices; W always stores its
diagonal explicitly, even where it is 0). Nothing builds a dense N x N array except loading a dense file.
"""

from __future__ import annotations

import math
import numbers
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph, csr_array

from dice_ray.errors import InputError, absent, first_line

if TYPE_CHECKING:
    import networkx

TOPOLOGIES: tuple[str, ...] = ("ring", "exponential", "grid", "torus", "star", "complete", "erdos-renyi",
                               "one-peer-exponential", "random-matching", "file")
TIME_VARYING: tuple[str, ...] = ("one-peer-exponential", "random-matching")  # W^t with weights of their own
WEIGHT_RULES: tuple[str, ...] = ("uniform", "metropolis")
MATRIX_SUFFIXES: tuple[str, ...] = (".npy", ".npz")  # "file" topologies with these suffixes give W itself
ER_MAX_DRAWS = 100


# ---------------------------------------------------------------------------------------------- helpers

def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name}={value!r} is invalid; it must be an integer >= {minimum}")
    return int(value)


def _adjacency_from_edges(n: int, src: np.ndarray, dst: np.ndarray, *, undirected: bool) -> csr_array:
    """Return the 0/1 adjacency A [n, n] with A[dst, src] = 1; self-loops dropped, duplicates merged."""
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    if undirected:
        src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    keep = src != dst
    a = csr_array((np.ones(int(keep.sum())), (dst[keep], src[keep])), shape=(n, n))
    a.sum_duplicates()
    a.data[:] = 1.0
    return a


def _pattern(matrix: Any) -> csr_array:
    """Return the 0/1 off-diagonal support of a square matrix as a csr_array (an adjacency)."""
    coo = sparse.coo_array(matrix)
    if coo.ndim != 2 or coo.shape[0] != coo.shape[1]:
        raise InputError(f"adjacency has shape {coo.shape}; it must be square N x N")
    keep = (coo.data != 0) & (coo.row != coo.col)
    return _adjacency_from_edges(coo.shape[0], coo.col[keep], coo.row[keep], undirected=False)


def _canonical(matrix: Any) -> csr_array:
    """Return a square matrix as float64 csr_array: sorted, no stored zeros except the whole diagonal."""
    coo = sparse.coo_array(matrix, dtype=np.float64)
    n = coo.shape[0]
    keep = coo.data != 0
    diag = np.arange(n)
    w = csr_array((np.concatenate([coo.data[keep], np.zeros(n)]),
                   (np.concatenate([coo.row[keep], diag]), np.concatenate([coo.col[keep], diag]))),
                  shape=coo.shape)
    w.sum_duplicates()
    return w


def _in_degrees(adjacency: csr_array) -> np.ndarray:
    return np.diff(adjacency.indptr)


# ----------------------------------------------------------------------------------------------- graphs

def ring_graph(n: int) -> csr_array:
    """Return the undirected ring's adjacency [n, n]: k <-> k+1 (mod n)."""
    n = _check_int(n, "n", 2)
    k = np.arange(n)
    return _adjacency_from_edges(n, k, (k + 1) % n, undirected=True)


def exponential_graph(n: int) -> csr_array:
    """Return the directed exponential graph's adjacency [n, n], as in the paper's code.

    Node l sends to (l + 2^i) mod n for every 2^i < n, so k receives from k-1, k-2, k-4, ...;
    every in-degree is floor(log2(n - 1)) + 1 (4 at n = 16).
    """
    n = _check_int(n, "n", 2)
    offsets = 2 ** np.arange((n - 1).bit_length())
    src = np.repeat(np.arange(n), len(offsets))
    return _adjacency_from_edges(n, src, (src + np.tile(offsets, n)) % n, undirected=False)


def _grid_shape(n: int, rows: int | None) -> tuple[int, int]:
    if rows is None:  # the most square factorization, rows <= cols
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    rows = _check_int(rows, "rows", 1)
    if n % rows:
        raise InputError(f"rows={rows} does not divide n={n}; a grid needs rows * cols == n")
    return rows, n // rows


def _grid_edges(n: int, rows: int | None, wrap: bool) -> csr_array:
    rows, cols = _grid_shape(_check_int(n, "n", 2), rows)
    r, c = np.divmod(np.arange(n), cols)  # node id = r * cols + c
    right, down = (c + 1 < cols), (r + 1 < rows)
    if wrap:  # duplicates (a side of 2) merge and self-loops (a side of 1) drop in _adjacency_from_edges
        right, down = np.ones(n, bool), np.ones(n, bool)
    src = np.concatenate([np.arange(n)[right], np.arange(n)[down]])
    dst = np.concatenate([(r * cols + (c + 1) % cols)[right], (((r + 1) % rows) * cols + c)[down]])
    return _adjacency_from_edges(n, src, dst, undirected=True)


def grid_graph(n: int, rows: int | None = None) -> csr_array:
    """Return the undirected rows x cols 2-D grid's adjacency [n, n] (node r * cols + c).

    ``rows`` defaults to the most square factorization (rows <= cols); a prime n gives a 1 x n path.
    """
    return _grid_edges(n, rows, wrap=False)


def torus_graph(n: int, rows: int | None = None) -> csr_array:
    """Return the undirected 2-D torus's adjacency [n, n]: ``grid_graph`` with wrap-around edges."""
    return _grid_edges(n, rows, wrap=True)


def star_graph(n: int) -> csr_array:
    """Return the undirected star's adjacency [n, n]; node 0 is the hub."""
    n = _check_int(n, "n", 2)
    return _adjacency_from_edges(n, np.zeros(n - 1, np.int64), np.arange(1, n), undirected=True)


def complete_graph(n: int) -> csr_array:
    """Return the complete graph's adjacency [n, n] (every off-diagonal entry 1; n(n-1) stored)."""
    n = _check_int(n, "n", 2)
    src, dst = np.divmod(np.arange(n * n), n)
    return _adjacency_from_edges(n, src, dst, undirected=False)


def erdos_renyi_graph(n: int, p: float, seed: int) -> csr_array:
    """Return a connected undirected Erdős–Rényi G(n, p) adjacency [n, n].

    Draws from ``np.random.default_rng(seed)`` until the graph is connected (at most 100 draws).
    """
    n, seed = _check_int(n, "n", 2), _check_int(seed, "seed", 0)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
        raise InputError(f"p={p!r} is invalid; the edge probability must be in (0, 1]")
    rng = np.random.default_rng(seed)
    for _ in range(ER_MAX_DRAWS):
        # m ~ Bin(n^2, p) cells chosen without replacement = an i.i.d. Bernoulli(p) coin per cell; keep i < j
        cells = rng.choice(n * n, size=rng.binomial(n * n, p), replace=False)
        i, j = np.divmod(cells, n)
        a = _adjacency_from_edges(n, i[i < j], j[i < j], undirected=True)
        if csgraph.connected_components(a, directed=False)[0] == 1:
            return a
    raise InputError(f"erdos-renyi graph with n={n}, p={p} was never connected in {ER_MAX_DRAWS} draws "
                     f"(seed={seed}); raise p")


# ------------------------------------------------------------------------------------------ weight rules

def uniform_weights(adjacency: Any) -> csr_array:
    """Return W [N, N] with W_kl = 1/(deg_k + 1) for l in N_in(k) ∪ {k}; deg_k = in-degree (row k of A)."""
    a = _pattern(adjacency)
    w = _canonical(a + sparse.eye_array(a.shape[0], format="csr"))
    w.data *= np.repeat(1.0 / (_in_degrees(a) + 1.0), np.diff(w.indptr))
    return w


def metropolis_weights(adjacency: Any) -> csr_array:
    """Return the Metropolis–Hastings W [N, N]: W_kl = 1/(1 + max(deg_k, deg_l)) on edges l -> k,
    W_kk = 1 - sum_{l != k} W_kl; deg = in-degree. Symmetric (doubly stochastic) on undirected graphs."""
    a = _pattern(adjacency)
    deg, a = _in_degrees(a), a.tocoo()
    off = csr_array((1.0 / (1.0 + np.maximum(deg[a.row], deg[a.col])), (a.row, a.col)), shape=a.shape)
    return _canonical(off + sparse.diags_array(1.0 - off.sum(axis=1)))


# ----------------------------------------------------------------------------------------- validation

def _strong_components(w: Any) -> int:
    # csgraph reads entry (i, j) as the edge i -> j: the reverse of ours, which has the same components.
    positive = csr_array(csr_array(w) > 0)
    return int(csgraph.connected_components(positive, directed=True, connection="strong")[0])


def is_strongly_connected(w: Any) -> bool:
    """Return True iff the graph of the positive entries of the square matrix w is strongly connected."""
    return _strong_components(w) == 1


def _check_stochastic(w: Any, *, atol: float, name: str) -> csr_array:
    """Check square, finite, non-negative and row-stochastic; return w as a canonical csr_array."""
    shape = w.shape if sparse.issparse(w) else np.shape(w)
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
        raise InputError(f"{name} has shape {tuple(shape)}; a mixing matrix must be square N x N")
    w = _canonical(w)
    if not np.all(np.isfinite(w.data)):
        raise InputError(f"{name} has NaN or infinite entries")
    if np.any(w.data < 0):
        coo = w.tocoo()
        bad = int(np.argmax(coo.data < 0))
        raise InputError(f"{name}[{coo.row[bad]}, {coo.col[bad]}] = {coo.data[bad]:g} is negative; "
                         "weights must be >= 0")
    sums = w.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > atol)
    if len(off):
        raise InputError(f"{name} row {off[0]} sums to {sums[off[0]]:.6g}, not 1 (atol={atol:g}; "
                         f"{len(off)} of {len(sums)} rows are off)")
    return w


def _validated(w: Any, *, atol: float, name: str) -> csr_array:
    w = _check_stochastic(w, atol=atol, name=name)
    components = _strong_components(w)
    if components != 1:
        raise InputError(f"{name} is not strongly connected: its graph has {components} strongly connected "
                         "components (every participant's update must reach every other through W)")
    return w


def validate_mixing_matrix(w: Any, *, atol: float = 1e-6, name: str = "W") -> None:
    """Raise InputError unless w (dense or sparse) is a valid mixing matrix.

    Valid: square N x N, finite, non-negative, every row sums to 1 within ``atol``, and the graph of its
    positive entries is strongly connected (every participant's update eventually reaches every other).
    """
    _validated(w, atol=atol, name=name)


# ------------------------------------------------------------------------------------------------ files

def load_edge_list(path: str | Path, n: int | None = None, *, directed: bool = False) -> csr_array:
    """Return the adjacency [n, n] of an edge-list file: one edge "src dst" or "src,dst" per line.

    '#' starts a comment; blank lines and self-loops are skipped; a first line of names ("src,dst", a CSV header)
    is skipped, and so is an edge's attribute dictionary ("0 1 {}", as ``networkx.write_edgelist`` writes it: W
    comes from the weight rule). Nodes are 0..n-1, and n defaults to the largest id + 1. Undirected unless
    ``directed`` (then "src dst" is the edge src -> dst).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"edge list file '{path}' {absent(path, 'file')}")
    src, dst = [], []
    first = True  # the first line with content, which may be a header
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (a spreadsheet's CSV) is no node id
    except UnicodeDecodeError:
        raise InputError(f"edge list '{path}' is not text (UTF-8): one edge 'src dst' per line") from None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split("{", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        header, first = first, False
        if len(fields) != 2:
            raise InputError(f"edge list '{path}' line {number}: expected 'src dst', got {line.strip()!r}")
        try:
            s, d = int(fields[0]), int(fields[1])
        except ValueError:
            if header and not any(f.lstrip("-").replace(".", "", 1).isdigit() for f in fields):  # "src,dst"
                continue
            raise InputError(f"edge list '{path}' line {number}: node ids must be integers, got "
                             f"{line.strip()!r}") from None
        if min(s, d) < 0 or (n is not None and max(s, d) >= n):
            valid = "must be >= 0" if n is None else f"must be in 0..{n - 1} (n={n})"
            raise InputError(f"edge list '{path}' line {number}: node ids {valid}, got {line.strip()!r}")
        src.append(s)
        dst.append(d)
    if not src:
        raise InputError(f"edge list '{path}' has no edges")
    n = _check_int(max(src + dst) + 1 if n is None else n, "n", 2)
    return _adjacency_from_edges(n, np.array(src), np.array(dst), undirected=not directed)


def load_mixing_matrix(path: str | Path) -> csr_array:
    """Return the validated W [N, N] stored in ``path``.

    Formats: .npy (dense), .npz (``scipy.sparse.save_npz``), .csv / .txt (dense text, comma or whitespace
    separated). Raises InputError if missing, unreadable, not square, not row-stochastic or not strongly
    connected.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"mixing matrix file '{path}' {absent(path, 'file')}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".csv", ".txt"):
        raise InputError(f"mixing matrix file '{path}' has suffix {suffix!r}; use .npy, .npz, .csv or .txt")
    try:
        if suffix == ".npy":
            w = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            w = sparse.load_npz(path)
        else:
            text = path.read_text(encoding="utf-8-sig")
            w = np.loadtxt(text.splitlines(), delimiter="," if "," in text else None, ndmin=2)
    except (OSError, ValueError, EOFError, UnicodeDecodeError, zipfile.BadZipFile, KeyError,
            MemoryError) as error:  # .npz: a zip of scipy's arrays; an empty .npy: EOFError
        raise InputError(f"mixing matrix file '{path}' could not be read: {first_line(error)}") from None
    if w.dtype.kind not in "biuf":  # complex: its imaginary part would be dropped; text: not numbers
        raise InputError(f"mixing matrix file '{path}' holds {w.dtype} values; W is real numbers")
    return _validated(w.astype(np.float64), atol=1e-6, name=f"W in '{path}'")


# ------------------------------------------------------------------------------------- time-varying W^t

def _one_peer_exponential(n: int, t: int) -> csr_array:
    """W^t [n, n]: k averages with (k - 2^(t mod m)) mod n, m = ceil(log2 n); W_kk = W_k,k-o = 1/2."""
    offset = 2 ** (t % (n - 1).bit_length())
    k = np.arange(n)
    return _canonical(csr_array((np.full(2 * n, 0.5), (np.tile(k, 2), np.concatenate([k, (k - offset) % n]))),
                                shape=(n, n)))


def _random_matching(n: int, seed: int, t: int) -> csr_array:
    """W^t [n, n] of a uniform random perfect matching drawn from default_rng([seed, t]); pairs average
    (1/2 each), an odd node out keeps weight 1."""
    perm = np.random.default_rng([seed, t]).permutation(n)
    a, b = perm[0:n - 1:2], perm[1::2]
    rows = np.concatenate([a, b, a, b, perm[len(a) + len(b):]])
    cols = np.concatenate([a, b, b, a, perm[len(a) + len(b):]])
    data = np.concatenate([np.full(4 * len(a), 0.5), np.ones(n % 2)])
    return _canonical(csr_array((data, (rows, cols)), shape=(n, n)))


def _union_period(sampler: Callable[[int], csr_array], n: int, name: str) -> int:
    """Smallest P such that the union of W^0..W^{P-1} is strongly connected (searched up to 10 n rounds)."""
    union = csr_array((n, n))
    for period in range(1, 10 * n + 1):
        union = union + sampler(period - 1)
        if is_strongly_connected(union):
            return period
    raise InputError(f"topology {name!r}: the union of W^0..W^{10 * n - 1} is not strongly connected")


# --------------------------------------------------------------------------------------------- Topology

class Topology:
    """A (possibly time-varying) sequence of mixing matrices W^t [N, N] for N participants.

    ``mixing`` is either one W (static: W^t = W for every t) or a pure function t -> W^t (time-varying).
    The constructor validates: static W with ``validate_mixing_matrix``; time-varying W^t row-stochastic
    for every t < period and the union W^0 + ... + W^{period-1} strongly connected.

    Attributes: ``name``; ``n``; ``time_varying``; ``period`` (1 for static; rounds over which the union
    graph is strongly connected); ``weights`` (the weight rule, or "fixed" where W comes as given: W files
    and time-varying topologies, whose weights are 1/2 per averaging pair).
    """

    def __init__(self, name: str, n: int, mixing: csr_array | Callable[[int], csr_array], *,
                 period: int = 1, weights: str = "fixed") -> None:
        self.name, self.n, self.weights = name, _check_int(n, "n", 2), weights
        self.time_varying = callable(mixing)
        self.period = _check_int(period, "period", 1) if self.time_varying else 1
        self._sampler: Callable[[int], csr_array] | None = mixing if callable(mixing) else None
        self._w: csr_array | None = None
        matrices = [mixing(t) for t in range(self.period)] if callable(mixing) else [mixing]
        for t, w in enumerate(matrices):
            if w.shape != (self.n, self.n):
                raise InputError(f"topology {name!r}: W^{t} has shape {w.shape}, not ({self.n}, {self.n})")
        if callable(mixing):
            union = sum((_check_stochastic(w, atol=1e-6, name=f"W^{t} of topology {name!r}")
                         for t, w in enumerate(matrices)), start=csr_array((self.n, self.n)))
            if not is_strongly_connected(union):
                raise InputError(f"topology {name!r}: the union of W^0..W^{self.period - 1} is not strongly "
                                 f"connected ({_strong_components(union)} strongly connected components)")
        else:
            self._w = _validated(mixing, atol=1e-6, name=f"W of topology {name!r}")

    def __repr__(self) -> str:
        return f"Topology(name={self.name!r}, n={self.n}, weights={self.weights!r}, period={self.period})"

    def mixing_matrix(self, t: int) -> csr_array:
        """Return W^t [N, N] (csr_array). Static: the same cached object every call (do not modify it).
        Time-varying: a pure function of (seed, t), so replays and resumes see the same W^t."""
        t = _check_int(t, "t", 0)
        return self._w if self._sampler is None else self._sampler(t)

    def in_neighbors(self, k: int, t: int) -> np.ndarray:
        """Return the sorted int array of l != k with W^t[k, l] > 0 (k's in-neighbours at round t)."""
        k = self._check_node(k, "k")
        w = self.mixing_matrix(t)
        cols, vals = w.indices[w.indptr[k]:w.indptr[k + 1]], w.data[w.indptr[k]:w.indptr[k + 1]]
        return cols[(vals > 0) & (cols != k)].astype(np.int64)

    def hop_distances(self, source: int, t: int = 0, max_hops: int | None = None) -> np.ndarray:
        """Return int array [N]: the step s at which source's round-t update first reaches each k, i.e. the
        least s with (W^{t+s-1} ... W^t)[k, source] > 0 (concepts §3's N^(s)); 0 at source, -1 if unreached
        within ``max_hops`` (default: unbounded for static W, N * period rounds for time-varying)."""
        source = self._check_node(source, "source")
        if max_hops is not None:
            max_hops = _check_int(max_hops, "max_hops", 0)
        if not self.time_varying:  # walks in a fixed graph: the first s is the BFS distance along l -> k
            hops = csgraph.shortest_path(csr_array(self._w.T > 0), unweighted=True, indices=source)
            dist = np.where(np.isfinite(hops), hops, -1).astype(np.int64)
            return np.where(dist > max_hops, -1, dist) if max_hops is not None else dist
        dist = np.full(self.n, -1, dtype=np.int64)
        dist[source] = 0
        reached = np.zeros(self.n)
        reached[source] = 1.0
        for s in range(1, (self.n * self.period if max_hops is None else max_hops) + 1):
            if np.all(dist >= 0):
                break
            reached = (self.mixing_matrix(t + s - 1) @ reached > 0).astype(np.float64)  # support of column
            dist[(dist < 0) & (reached > 0)] = s
        return dist

    def adjacency(self, t: int = 0) -> csr_array:
        """Return the 0/1 adjacency [N, N] of W^t: A[k, l] = 1 iff l != k and W^t[k, l] > 0."""
        return _pattern(self.mixing_matrix(t))

    def to_networkx(self, t: int = 0) -> networkx.DiGraph:
        """Return W^t as a networkx.DiGraph: edge l -> k with attribute weight = W^t[k, l] for l != k, and
        node attribute self_weight = W^t[k, k] (no self-loop edges, so degrees and centrality stay plain)."""
        import networkx as nx

        w = self.mixing_matrix(t)
        graph = nx.DiGraph(name=self.name)
        graph.add_nodes_from((k, {"self_weight": float(v)}) for k, v in enumerate(w.diagonal()))
        w = w.tocoo()
        off = (w.row != w.col) & (w.data > 0)
        edges = zip(w.col[off].tolist(), w.row[off].tolist(), w.data[off].tolist(), strict=True)
        graph.add_weighted_edges_from(edges)  # l -> k carries W[k, l]
        return graph

    def describe(self) -> dict[str, Any]:
        """Return a JSON-able summary: name, n, time_varying, period, weights, edges (directed edges of W^0,
        off-diagonal), min_in_degree and max_in_degree (of W^0)."""
        degrees = _in_degrees(self.adjacency(0))
        return {"name": self.name, "n": self.n, "time_varying": self.time_varying, "period": self.period,
                "weights": self.weights, "edges": int(degrees.sum()), "min_in_degree": int(degrees.min()),
                "max_in_degree": int(degrees.max())}

    def _check_node(self, k: int, name: str) -> int:
        k = _check_int(k, name, 0)
        if k >= self.n:
            raise InputError(f"{name}={k} is out of range; participants are 0..{self.n - 1}")
        return k


def make_topology(name: str, n: int, *, weights: str = "uniform", seed: int = 0, p: float | None = None,
                  rows: int | None = None, path: str | Path | None = None,
                  directed: bool = False) -> Topology:
    """Return the validated Topology ``name`` for n >= 2 participants.

    ``weights`` (uniform | metropolis) turns a static graph into W; time-varying topologies and W files
    (.npy/.npz) carry their own weights and ignore it. ``seed`` drives erdos-renyi and random-matching;
    ``p`` is the Erdős–Rényi edge probability (default min(1, 2 ln(n)/n), connected w.h.p.); ``rows`` the
    grid/torus height; ``path`` the file of topology "file" (.npy/.npz: W itself, n must match; anything
    else: an edge list, undirected unless ``directed``).
    """
    if name not in TOPOLOGIES:
        raise InputError(f"topology {name!r} is unknown; choose one of {', '.join(TOPOLOGIES)}")
    if weights not in WEIGHT_RULES:
        raise InputError(f"weights {weights!r} is unknown; choose one of {', '.join(WEIGHT_RULES)}")
    n, seed = _check_int(n, "n", 2), _check_int(seed, "seed", 0)
    if name == "one-peer-exponential":
        return Topology(name, n, lambda t: _one_peer_exponential(n, t), period=(n - 1).bit_length())
    if name == "random-matching":
        sampler = lambda t: _random_matching(n, seed, t)
        return Topology(name, n, sampler, period=_union_period(sampler, n, name))
    if name == "file":
        if path is None:
            raise InputError("topology 'file' needs path= (a .npy/.npz mixing matrix or an edge list)")
        if Path(path).suffix.lower() in MATRIX_SUFFIXES:
            w = load_mixing_matrix(path)
            if w.shape != (n, n):
                raise InputError(f"n={n} does not match the mixing matrix in '{path}' of shape {w.shape}")
            return Topology(name, n, w)
        graph = load_edge_list(path, n, directed=directed)
        named = np.flatnonzero(np.asarray(graph.sum(axis=0)).ravel() + np.asarray(graph.sum(axis=1)).ravel())
        if len(named) and named.max() < n - 1:  # "not strongly connected" would not name the cause
            left = (f"participant {n - 1}" if named.max() + 1 == n - 1 else
                    f"participants {named.max() + 1}..{n - 1}")
            raise InputError(f"edge list '{path}' names participants 0..{named.max()}, but the run has {n} "
                             f"(nodes, --nodes): {left} would have no edge")
    elif name == "erdos-renyi":
        graph = erdos_renyi_graph(n, min(1.0, 2 * math.log(n) / n) if p is None else p, seed)
    elif name in ("grid", "torus"):
        graph = (grid_graph if name == "grid" else torus_graph)(n, rows)
    else:
        graph = {"ring": ring_graph, "exponential": exponential_graph, "star": star_graph,
                 "complete": complete_graph}[name](n)
    rule = uniform_weights if weights == "uniform" else metropolis_weights
    return Topology(name, n, rule(graph), weights=weights)
