"""Ray nodes started with the real ``ray start``, on 127.0.0.1 only, for the cluster tests.

Every ``ray start`` runs in a process group of its own and with a temp dir of its own; ``RayStart.stop`` kills
exactly the processes of those groups, their descendants and any process that names the temp dir, never other
Ray processes on the machine (``ray stop`` would stop every Ray of this user). Ray rewrites 127.0.0.1 in
``--address`` and ``--node-ip-address`` into the machine's external address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set in the process (``loopback_env``); see docs/how-to/cluster.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(**extra: str) -> dict[str, str]:
    """This process's environment with Ray kept on 127.0.0.1 and this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"})
    env.update(extra)
    return env


def external_addresses() -> set[str]:
    """This machine's IPv4 addresses other than loopback (which no Ray process of a test may use)."""
    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")}


class RayStart:
    """``ray start`` processes under one temp dir; ``stop`` ends them all, and only them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="drt-", dir="/tmp"))  # short: Unix socket paths are short
        self.env = env
        self.groups: list[int] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Run ``ray start ARGS --temp-dir ...`` (it returns once the node is up); return its output."""
        log = self.temp_dir / f"ray-start-{len(self.groups)}.log"  # a file: the daemons must not hold a pipe open
        with open(log, "w") as f:
            proc = subprocess.Popen([RAY, "start", *args, f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
                                    env=env or self.env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.groups.append(proc.pid)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out = log.read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}")
        return out

    def processes(self) -> list[psutil.Process]:
        """Every live process of these nodes: the ``ray start`` groups, their descendants, and anything naming
        the temp dir on its command line."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            try:
                mine = os.getpgid(proc.pid) in self.groups or str(self.temp_dir) in " ".join(proc.info["cmdline"] or [])
                if mine:
                    found[proc.pid] = proc
                    found.update((c.pid, c) for c in proc.children(recursive=True))
            except (psutil.Error, ProcessLookupError):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def raylet_of(self, node_id: str) -> psutil.Process:
        """The raylet process of the node ``node_id`` (hex)."""
        for proc in self.processes():
            try:
                cmdline = proc.cmdline()
            except psutil.Error:
                continue
            if Path(cmdline[0]).name == "raylet" and f"--node_id={node_id}" in cmdline:
                return proc
        raise LookupError(f"no raylet of node {node_id}")

    def kill_tree(self, proc: psutil.Process) -> None:
        """SIGKILL ``proc`` and its descendants (a machine lost without warning)."""
        victims = [proc, *proc.children(recursive=True)]
        for p in victims:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)

    def stop(self, remove: bool = True) -> None:
        """Kill every process of these nodes (several passes: a dying raylet may still spawn a worker) and
        remove the temp dir."""
        for _ in range(5):
            procs = self.processes()
            if not procs:
                break
            for group in self.groups:
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for p in procs:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=30)
            time.sleep(0.5)
        if remove:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def cluster_nodes(address: str, env: dict[str, str]) -> list[dict]:
    """Every node the cluster has had (NodeID, Alive, NodeManagerAddress, Resources), asked by a driver."""
    code = (f"import json, ray; ray.init(address={address!r}, log_to_driver=False); keys = ('NodeID', 'Alive', "
            "'NodeManagerAddress', 'Resources'); print(json.dumps([{k: n[k] for k in keys} for n in ray.nodes()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def node_of(pid: int) -> psutil.Process:
    """The raylet that started process ``pid`` (a Ray worker is its raylet's child): its machine."""
    for parent in psutil.Process(pid).parents():
        if Path(parent.exe()).name == "raylet":
            return parent
    raise LookupError(f"process {pid} has no raylet among its parents")


def assert_loopback_only(nodes: RayStart) -> None:
    """No process of the cluster listens on, or talks to, anything but 127.0.0.1."""
    for proc in nodes.processes():
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in connections:
            for addr in (c.laddr, c.raddr):
                if addr:
                    assert addr.ip in ("127.0.0.1", "::ffff:127.0.0.1"), (proc.name(), c)
