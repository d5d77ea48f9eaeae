"""Small tensor utilities shared by the population, the participant block and the methods (torch, numpy, scipy)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch


def as_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Return ``a`` as a tensor without copying when possible (object-store arrays are read-only and
    are never written through these tensors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.as_tensor(a, device=device)


def on_host(value: Any) -> Any:
    """``value`` with every tensor in it as a numpy array on the host (detached, copied off its device): a tensor,
    or a mapping's values (one level), as hooks return them; anything else as it is."""
    if isinstance(value, Mapping):
        return {key: _host_array(v) for key, v in value.items()}
    return _host_array(value)


def _host_array(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def tensor_copies(value: Any, device: torch.device | None = None) -> Any:
    """``value`` with every tensor in it detached and copied (onto ``device``; None: each on its own), through
    mappings, lists, tuples (named ones too), sets, dataclasses and other objects' attributes (``vars``), at any depth;
    anything else as it is (shared). What a block publishes for a device transport, whose readers may map the copy
    while the block goes on with its live tensors, and which carries tensors of one device. Objects are copied
    shallowly (``copy.copy``) and their attributes replaced; an object with ``__slots__`` and no ``__dict__`` is
    shared as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device or value.device, copy=True)
    if value is None or isinstance(value, (np.ndarray, np.generic, str, bytes, int, float, complex, type)):
        return value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(tensor_copies(v, device) for v in value))
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(tensor_copies(v, device) for v in value)
    if isinstance(value, Mapping):
        out = copy.copy(value) if isinstance(value, MutableMapping) else {}
        for key, v in value.items():
            out[key] = tensor_copies(v, device)
        return out
    if hasattr(value, "__dict__"):  # dataclasses (init=False fields too) and plain objects
        out = copy.copy(value)
        vars(out).update({name: tensor_copies(v, device) for name, v in vars(value).items()})
        return out
    return value


def to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """``arrays`` (of one dtype) as tensors on ``device``, in their shapes, through ONE host-to-device copy (views of
    it). On a GPU each copy of a small array from the host's pageable memory waits for the device's queue: many small
    index arrays uploaded one by one (one per probe and round) cost a round as many waits."""
    if not arrays:
        return []
    if len({a.dtype for a in arrays}) > 1:
        raise ValueError(f"to_device takes arrays of one dtype, got {sorted({str(a.dtype) for a in arrays})}")
    flat = torch.as_tensor(np.concatenate([np.ravel(a) for a in arrays]), device=device)
    return [part.view(a.shape) for part, a in zip(torch.split(flat, [a.size for a in arrays]), arrays, strict=True)]


def csr_tensor(w: sp.csr_array, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return scipy CSR ``w`` as a torch sparse CSR tensor of ``dtype`` (float32 or float64)."""
    w = w.astype(np.float64 if dtype == torch.float64 else np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(torch.from_numpy(w.indptr.astype(np.int64)),
                                       torch.from_numpy(w.indices.astype(np.int64)),
                                       torch.from_numpy(w.data), size=w.shape, device=device)


def edge_dots(pairs: list[tuple[torch.Tensor, torch.Tensor]], ra: np.ndarray, rb: np.ndarray) -> list[torch.Tensor]:
    """Return, for each (a [P, D], b [M, D]) of ``pairs``, [E]: a[ra[e]] · b[rb[e]] for every edge e.

    Sampled dense-dense products (only the E entries of a bᵀ are computed): 7x faster here than gathering
    rows per edge; in float64 when the inputs are, exact to rounding.
    """
    a0, b0 = pairs[0]
    order = np.lexsort((rb, ra))
    crow = np.concatenate([[0], np.cumsum(np.bincount(ra, minlength=a0.shape[0]))])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        pattern = torch.sparse_csr_tensor(torch.as_tensor(crow, dtype=torch.int64),
                                          torch.as_tensor(rb[order], dtype=torch.int64),
                                          torch.zeros(len(ra), dtype=a0.dtype), size=(a0.shape[0], b0.shape[0]),
                                          device=a0.device)
    back = torch.as_tensor(np.argsort(order), device=a0.device)
    return [torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()[back] for a, b in pairs]


FLOAT64_SLICE_BYTES = 2**29  # float64 working memory of a method's per-edge products taken a slice at a time


def float64_budget(device: Any) -> int:
    """The float64 working memory a method's slice of per-edge work may take (proximal influence, the ledger):
    ``FLOAT64_SLICE_BYTES``, or on a GPU a sixteenth of its memory (fewer slices: each costs the host a few waits for
    the device)."""
    device = torch.device(device)
    if device.type != "cuda":
        return FLOAT64_SLICE_BYTES
    return max(FLOAT64_SLICE_BYTES, torch.cuda.get_device_properties(device).total_memory // 16)


def float64_chunks(count: int, numbers_each: int, device: Any) -> list[slice]:
    """Slices of ``range(count)`` items (coordinates, edges) of which one slice, at ``numbers_each`` float64 numbers
    an item, fits ``float64_budget(device)``."""
    step = max(1, float64_budget(device) // (8 * max(1, numbers_each)))
    return [slice(lo, lo + step) for lo in range(0, count, step)]


def sum_by_key(keys: list[np.ndarray] | tuple, values: list[np.ndarray] | tuple) -> tuple[np.ndarray, np.ndarray]:
    """Return (sorted unique keys, per-key sums of values)."""
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    return unique, np.bincount(inverse, np.concatenate(values), minlength=len(unique))
