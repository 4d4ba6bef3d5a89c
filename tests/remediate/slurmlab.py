"""A real, throw-away Slurm cluster on 127.0.0.1: munged + slurmctld + one slurmd per fake node.

Used by the remediation integration tests (conftest.py) and by benchmarks/xid_to_drain.py.
Each fake GPU node shares this host (NodeHostname=localhost, its own slurmd port); gres.conf
points at character devices made with mknod (major 195 is the NVIDIA driver's), since slurmd
checks that every GRES File= exists as a device.  Needs root (mknod, SlurmUser=root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "munged", "scontrol")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmLab:
    root: Path
    nodes: list[str]
    conf: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def scontrol(self) -> list[str]:
        return [shutil.which("scontrol") or "scontrol"]

    def run(self, *args: str) -> str:
        """Run scontrol as an operator would (for test set-up and read-back)."""
        out = subprocess.run([*self.scontrol, *args], env=self.env, capture_output=True,
                             text=True, timeout=20)
        if out.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def node_fields(self, node: str) -> dict[str, str]:
        """State=, Reason= ... of one node, parsed from `scontrol show node -o`."""
        from collector.remediate.slurm import parse_show_node
        return parse_show_node(self.run("show", "node", "-o", node))

    def reset(self) -> None:
        """Every node back to idle with no reason (between tests)."""
        for node in self.nodes:
            f = self.node_fields(node)
            if "DRAIN" in f.get("State", "") or f.get("Reason"):
                self.run("update", f"NodeName={node}", "State=RESUME")
        self.wait_idle()

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs in {self.root}")
            with contextlib.suppress(RuntimeError):
                states = {n: self.node_fields(n).get("State", "") for n in self.nodes}
                if all(s.split("+")[0] == "IDLE" for s in states.values()):
                    return
            time.sleep(0.2)
        raise TimeoutError(f"slurm nodes not idle after {timeout}s: {states}; logs in {self.root}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        self.procs.clear()


def _write_config(root: Path, nodes: list[str], gpus: int, extra: list[str]) -> Path:
    ctld_port = _free_port()
    node_lines = []
    for i, node in enumerate(nodes):
        node_lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 "
                          f"Port={_free_port()} Gres=gpu:{gpus} CPUs=2 RealMemory=1000 State=UNKNOWN")
        devdir = root / "dev" / node
        devdir.mkdir(parents=True)
        for g in range(gpus):
            # one character device per fake GPU, as the NVIDIA driver makes them (major 195)
            subprocess.run(["mknod", str(devdir / f"nvidia{g}"), "c", "195", str(i * gpus + g)], check=True)
    gres = [f"NodeName={node} Name=gpu File={root}/dev/{node}/nvidia[0-{gpus - 1}]" for node in nodes]
    (root / "gres.conf").write_text("\n".join(gres) + "\n")
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=shopfloortest",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"AuthInfo=socket={root}/munge.socket",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root}/ctld",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2",
        "GresTypes=gpu",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        *(extra or ["HealthCheckInterval=0"]),
        *node_lines,
        f"PartitionName=gpu Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")
    (root / "ctld").mkdir()
    for node in nodes:
        (root / "spool" / node).mkdir(parents=True)
    return conf


@contextlib.contextmanager
def slurm_lab(nodes: list[str] | None = None, gpus: int = 8, extra_conf: list[str] | None = None):
    """Start munged, slurmctld and a slurmd per node; yield a SlurmLab; stop and clean up.

    extra_conf: more slurm.conf lines (e.g. HealthCheckProgram=...)."""
    nodes = nodes or [f"gpu-{i:03d}" for i in range(1, 5)]
    # The daemons run in their own sessions, so they would outlive a test run stopped with
    # SIGTERM (e.g. by `timeout`); turn SIGTERM into SystemExit so the `finally` below stops them.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    root = Path(tempfile.mkdtemp(prefix="shopfloor-slurm-"))
    os.chmod(root, 0o755)   # munged refuses sockets in group/world-writable directories
    lab = SlurmLab(root, nodes, _write_config(root, nodes, gpus, list(extra_conf or [])))
    try:
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)

        def start(cmd: list[str], log: str) -> None:
            with open(root / log, "ab") as out:
                lab.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                  env=lab.env, start_new_session=True))

        start(["munged", "--foreground", "--force", f"--socket={root}/munge.socket",
               f"--key-file={key}", f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
               f"--seed-file={root}/munged.seed"], "munged.out")
        deadline = time.monotonic() + 10
        while not (root / "munge.socket").exists():
            if time.monotonic() > deadline or lab.procs[0].poll() is not None:
                raise RuntimeError(f"munged did not start: {(root / 'munged.out').read_text(errors='replace')}")
            time.sleep(0.05)
        start(["slurmctld", "-D", "-i", "-f", str(lab.conf)], "slurmctld.out")
        for node in nodes:
            start(["slurmd", "-D", "-N", node, "-f", str(lab.conf)], f"slurmd-{node}.out")
        lab.wait_idle()
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(root, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
