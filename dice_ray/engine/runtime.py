"""Starting Ray, and sizing the participant-group actor pool from the cluster's resources."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dice_ray.config import EngineConfig
from dice_ray.errors import InputError, first_line


def starts_local_ray(engine: EngineConfig) -> bool:
    """Whether ``start_ray`` will start a local Ray for ``engine``: no cluster to join (``engine.address``,
    ``RAY_ADDRESS``) and none this process is connected to already."""
    import ray

    return not (engine.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def start_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray (with ``num_gpus``
    GPU resources if given: without CUDA, actors that ask for GPUs then run on the CPU, as in a rehearsal).

    A local Ray listens on 127.0.0.1 only and starts no dashboard. Does nothing if Ray is running, unless
    ``address`` names another cluster than the one this process is connected to: then ``InputError`` (a run would
    otherwise go, silently, to the Ray already running).
    """
    import ray

    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address and address != "auto" and not _same_address(address, current):
            raise InputError(f"engine.address (--address) {address}: this process is already connected to the Ray "
                             f"at {current}; call ray.shutdown() first to run on another cluster")
        return
    if address or os.environ.get("RAY_ADDRESS"):
        with _sigterm_kept():
            _join(address or os.environ["RAY_ADDRESS"], "engine.address (--address)" if address else "RAY_ADDRESS")
        return
    # Ray binds a local node to the machine's external address unless it thinks it runs on a laptop
    # OS: this switch (read from the environment by Ray's processes, and by the driver at import time,
    # hence the constant too) keeps every Ray process on 127.0.0.1. Only for a local Ray: a driver
    # joining a cluster must report its real address.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": always a new Ray of this process's own, never another job's running one (ray.init()
    # alone joins the newest local Ray it finds, and dies with it).
    # Ray's notice that a new local cluster uses token authentication (its default, kept) would print on every run,
    # for a cluster this process starts, owns and stops
    with _sigterm_kept(), dropped_log_lines("ray._private.authentication.authentication_token_setup",
                                            "Token authentication is enabled for this Ray cluster"):
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=True)


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """Keep the Python handler of SIGTERM set before the block (the command lines' ``errors.stops_on_sigterm``): a
    Ray driver's start installs Ray's own, which dumped a stack and aborted a run or a sweep that the docs say stops
    as Ctrl-C does, with its resume line (the local engine, which starts no Ray, did)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def dropped_log_lines(name: str, *starts: str) -> Iterator[None]:
    """Drop the records of logger ``name`` that begin with one of ``starts`` while the block runs (a library's line
    that says nothing to a dice-ray user, or says the wrong thing); anything else it logs still prints."""
    import logging

    logger = logging.getLogger(name)

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(starts)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _same_address(address: str, current: str) -> bool:
    """Whether ``address`` (host:port, or a ``ray://`` client address, which cannot be compared and counts as the
    same) names the cluster whose GCS is at ``current`` (host:port)."""
    if "://" in address:
        return True

    def resolved(where: str) -> tuple[str, str]:
        host, _, port = where.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        with contextlib.suppress(OSError):
            host = socket.gethostbyname(host)
        return ("127.0.0.1" if host.startswith("127.") or host == "::1" else host), port

    return resolved(address) == resolved(current)


def _join(address: str, given_by: str = "engine.address (--address)") -> None:
    """Join the Ray cluster at ``address`` (``given_by``: the option or variable that named it); raise ``InputError``
    with one line saying what to check when it cannot be reached or does not accept this process's token (Ray itself
    retries for minutes, then prints a traceback)."""
    import ray
    from ray._private import ray_constants

    loopback = False
    if address != "auto" and "://" not in address:
        host, _, port = address.rpartition(":")
        loopback = host.strip("[]") in ("", "127.0.0.1", "localhost", "::1")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            raise InputError(f"{given_by} {address}: no Ray head answers there ({reason}); check the host and port "
                             "(`ray status` on the head prints them) and that the head is running") from None
    # Ray rewrites a loopback address into this machine's external one (it assumes the head listens there). A head
    # that answered on loopback above listens there (a cluster kept on 127.0.0.1): keep the address as given. The
    # driver's own address still comes from the node it joins.
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = cluster and not loopback
    try:
        with _held_stderr():
            try:
                ray.init(address=address, log_to_driver=True)
            except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as err:
                ray.shutdown()
                raise _join_error(f"{given_by} {address}", err) from None
            except (ValueError, AssertionError) as err:  # a scheme Ray does not take (a dashboard's http://
                # address, say; Ray before 2.57 asserts it has a client builder for the scheme)
                ray.shutdown()
                raise InputError(f"{given_by} {address} is not a Ray address ({first_line(err)[:120]}): give the "
                                 "head's host:port (`ray status` on the head prints it), or ray://host:port for Ray "
                                 "Client") from None
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster


def _join_error(where: str, err: BaseException) -> InputError:
    """The one line for a failed join to ``where`` (the option and address): token authentication if anything in the
    error's chain says so (Ray wraps its AuthenticationError in a RuntimeError and a ConnectionError), else what to
    check."""
    import ray

    causes: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    auth = any(isinstance(e, ray.exceptions.AuthenticationError) or "auth" in str(e).lower() for e in causes)
    hint = ("the cluster uses token authentication: set RAY_AUTH_MODE=token and the cluster's token "
            "(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token from the head) in this environment" if auth else
            "check that this machine can reach every Ray port of the head, and that its Ray version matches")
    return InputError(f"{where}: could not join the Ray cluster; {hint}")


@contextlib.contextmanager
def _held_stderr() -> Iterator[None]:
    """Hold what is written to file descriptor 2 meanwhile (Ray's C++ core prints a warning there on every retry of
    a join it will give up) and write it out if the block succeeds; drop it if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
                sys.stderr.flush()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (a Ray worker's: over every task or actor call it ran)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_device() -> str:
    """The torch device of this Ray worker: "cuda" when Ray assigned it a GPU and CUDA is there, else "cpu" (a
    logical GPU without CUDA, as in a rehearsal, computes on the CPU). Participant groups and replay tasks alike."""
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def tune_allocator() -> None:
    """Keep large freed blocks in this process's heap instead of returning them to the OS.

    Every local step allocates and frees gradient and activation tensors of many MB; with glibc's
    defaults each one is a fresh mmap whose pages fault in again on every round (measured at N = 256:
    the gradient pass 12.0 -> 8.7 ms, gossip 7.4 -> 5.6 ms). No-op where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap


@dataclass(frozen=True)
class ActorPlan:
    """How participants are placed: ``blocks[i]`` are the global ids hosted by actor i."""

    blocks: list[np.ndarray]
    cpus_per_actor: float
    gpus_per_actor: float
    threads_per_actor: int
    per_machine: bool = False


def check_local_cpus(engine: EngineConfig, nodes: int) -> None:
    """Before a local Ray starts (about 5 s, more on a loaded machine): refuse actors whose CPUs this machine lacks,
    the check ``plan_actors`` makes once Ray counts them. Only what is known without Ray: a given
    ``engine.cpus_per_actor`` over the given actors (a local Ray's default: one), never more than ``nodes``. Nothing
    where a cluster is joined (``engine.address``, ``RAY_ADDRESS``) or this process's Ray is running already."""
    if not starts_local_ray(engine):
        return
    cpus, have = engine.cpus_per_actor, os.cpu_count() or 1
    if cpus is None or (engine.actors is None and engine.gpus_per_actor > 0):  # actors per GPU: Ray counts those
        return
    actors = min(engine.actors or 1, nodes)
    if actors * cpus > have + 1e-9:
        raise InputError(f"{actors} actors x engine.cpus_per_actor (--cpus-per-actor) {cpus:g} exceed this "
                         f"machine's {have} CPUs (a local Ray has those)")


def plan_actors(engine: EngineConfig, nodes: int, cluster_cpus: float, cluster_gpus: float,
                machine_cpus: list[float] | None = None, machine_gpus: list[float] | None = None) -> ActorPlan:
    """Return the actor plan: ``engine.actors`` actors, capped at ``nodes``; participants split into
    contiguous blocks. Default: one actor per GPU share when ``gpus_per_actor`` > 0, else one actor per
    machine (``machine_cpus``: the CPUs of each Ray node) with the CPUs of the smallest machine — torch
    parallelizes within an actor, and participants in one actor exchange parameters in place instead of
    through the object store. ``per_machine`` in the plan says the actors are to be pinned one per node.

    Every actor must fit on one machine (``machine_cpus`` and ``machine_gpus``, each node's; without them the
    cluster counts as one machine): CPUs an actor is not given are the most that let every actor find a machine
    (with GPUs: the CPUs of the GPU machines over the actors each holds, not the head's). A plan that does not fit
    raises ``InputError`` here; Ray would otherwise wait for room that never comes."""
    if not machine_cpus or (machine_gpus is None and cluster_gpus):  # GPUs not known per machine: one machine
        machines = [(cluster_cpus, cluster_gpus)]
    else:
        machines = list(zip(machine_cpus, machine_gpus or [0.0] * len(machine_cpus), strict=True))
    gpus = engine.gpus_per_actor
    if gpus > 0 and cluster_gpus < gpus:
        raise InputError(f"engine.gpus_per_actor (--gpus-per-actor) {gpus} but the Ray cluster has "
                         f"{cluster_gpus:g} GPUs")

    def room(cpus: float) -> int:
        """How many actors of ``cpus`` CPUs (and ``gpus`` GPUs) the machines hold."""
        return sum(min(math.floor(c / cpus + 1e-9) if cpus > 0 else nodes,
                       math.floor(g / gpus + 1e-9) if gpus > 0 else nodes) for c, g in machines)

    if engine.actors is not None:
        actors = engine.actors
    elif gpus > 0:
        actors = max(1, sum(math.floor(g / gpus + 1e-9) for _, g in machines))
    else:
        actors = max(1, len(machines))
    per_machine = engine.actors is None and gpus == 0 and len(machines) > 1 and actors <= nodes
    actors = min(actors, nodes)
    if gpus > 0 and actors * gpus > cluster_gpus + 1e-9:
        raise InputError(f"{actors} actors x engine.gpus_per_actor (--gpus-per-actor) {gpus} exceed the cluster's "
                         f"{cluster_gpus:g} GPUs")
    if engine.cpus_per_actor is not None:
        cpus = engine.cpus_per_actor
    elif per_machine:
        cpus = min(c for c, _ in machines)
    else:  # the most CPUs each (up to an even share) with which every actor finds a machine: some machine's CPUs
        # over k, and at least total / (actors + machines), which always fits (each machine loses < 1 actor to floor)
        fair, floor_share = max(cluster_cpus, 1) / actors, max(cluster_cpus, 1) / (actors + len(machines))
        shares = sorted({c / k for c, _ in machines if c > 0
                         for k in range(max(1, math.floor(c / fair)), math.ceil(c / floor_share) + 2)
                         if c / k <= fair + 1e-9}, reverse=True)
        cpus = next((share for share in shares if room(share) >= actors), fair)
    if actors * cpus > cluster_cpus + 1e-9:
        raise InputError(f"{actors} actors x engine.cpus_per_actor (--cpus-per-actor) {cpus:g} exceed the cluster's "
                         f"{cluster_cpus:g} CPUs")
    fit = room(cpus)
    if fit < actors:
        shown = ", ".join(f"{c:g} CPU{'s' * (c != 1)}" + (f" + {g:g} GPU{'s' * (g != 1)}" if g else "")
                          for c, g in machines[:8])
        raise InputError(f"{actors} actors of {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "") +
                         f" each: only {fit} fit on the cluster's machines ({shown}"
                         f"{', ...' if len(machines) > 8 else ''}); an actor runs on one machine — fewer actors "
                         "(engine.actors, --actors) or fewer CPUs each (engine.cpus_per_actor, --cpus-per-actor)")
    return ActorPlan(blocks=[b.astype(np.int64) for b in np.array_split(np.arange(nodes), actors)],
                     cpus_per_actor=cpus, gpus_per_actor=gpus, threads_per_actor=max(1, math.floor(cpus)),
                     per_machine=per_machine)
