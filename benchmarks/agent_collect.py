"""CPU time per collection and peak memory of the agent, for a node with 8 GPUs, 4 EFA devices
and hwmon (recorded fixtures), plus a peer ratio against Prometheus' node_exporter.

    .venv/bin/python benchmarks/agent_collect.py [--collections 300]

What one "collection" is: what the agent does every interval, i.e. collect every source
(NVML through the recorded 8x B200 replay, EFA and hwmon/RAPL from tests/fixtures/sysfs; the
ipmitool child process is left out, its CPU is the child's), add self-metrics, encode the OTLP
request (agent.runner.collect_sources + agent.export.otlp.encode_request), and render the
/metrics text once (a Prometheus scrape per interval). CPU is time.process_time() (user+system
of this process) over many collections; memory is the peak resident set (getrusage ru_maxrss)
of this process, which has imported everything the running agent imports.

Peer: node_exporter (Debian package prometheus-node-exporter) reading the same sysfs fixture with
only its hwmon and infiniband collectors, versus the agent's EFA + power sources on the same
tree, both producing the Prometheus exposition. node_exporter's CPU is read from
/proc/<pid>/stat around N scrapes over HTTP, so its figure includes serving HTTP, ours does
not (an advantage to node_exporter of a few hundred microseconds per scrape). Skipped, saying
so, when node_exporter is not installed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.export.otlp import encode_request  # noqa: E402
from agent.export.prometheus import render  # noqa: E402
from agent.runner import collect_sources  # noqa: E402
from agent.sources.efa import EfaSource  # noqa: E402
from agent.sources.nvml import NvmlSource  # noqa: E402
from agent.sources.power import PowerSource  # noqa: E402
from tests.agent.nvml_replay import NvmlReplay  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
RESOURCE = {"cluster": "bench", "node": "gpu-0001", "rack": "r01"}


def per_collection(sources, n: int) -> dict[str, float]:
    """CPU seconds per collection (collect + self-metrics + OTLP encoding), per /metrics render,
    and for each source alone; plus points and OTLP bytes per collection."""
    data, selfm = collect_sources(sources)  # warm-up: discovery, caches
    t0 = time.process_time()
    for _ in range(n):
        data, selfm = collect_sources(sources)
        points = data + selfm
        body = encode_request(points, RESOURCE, 1, time.time_ns())
    out = {"collection": (time.process_time() - t0) / n, "points": len(points), "bytes": len(body)}
    t0 = time.process_time()
    for _ in range(n):
        encode_request(points, RESOURCE, 1, time.time_ns())
    out["encode"] = (time.process_time() - t0) / n
    t0 = time.process_time()
    for _ in range(n):
        render(points, RESOURCE)
    out["render"] = (time.process_time() - t0) / n
    for src in sources:
        t0 = time.process_time()
        for _ in range(n):
            src.collect()
        out[src.name] = (time.process_time() - t0) / n
    return out


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def node_exporter_peer(n: int) -> tuple[float, float, int] | None:
    binary = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if not binary:
        return None
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
                             "--collector.hwmon", "--collector.infiniband",
                             f"--path.sysfs={FIXTURES / 'sysfs'}", "--web.disable-exporter-metrics"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        for _ in range(100):
            try:
                body = urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                time.sleep(0.05)
        lines = sum(1 for ln in body.decode().splitlines() if ln and not ln.startswith("#"))
        cpu0 = proc_cpu_seconds(proc.pid)
        for _ in range(n):
            urllib.request.urlopen(url, timeout=5).read()
        cpu = (proc_cpu_seconds(proc.pid) - cpu0) / n
        return cpu, proc_rss_mb(proc.pid), lines
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--collections", type=int, default=300)
    args = ap.parse_args()
    n = args.collections
    sysfs = str(FIXTURES / "sysfs")
    efa = EfaSource(sysfs_root=sysfs)
    power = PowerSource(sysfs_root=sysfs, ipmitool_command=None)
    nvml = NvmlSource(nvml=NvmlReplay(FIXTURES / "nvml" / "recorded_b200x8.json"), xid_events=False)
    efa_devices = len(list((FIXTURES / "sysfs" / "class" / "infiniband").iterdir()))

    full = per_collection([nvml, efa, power], n)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    host = per_collection([efa, power], n)
    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731

    print(f"node: 8 GPUs (NVML replay), {efa_devices} EFA devices, hwmon + RAPL (tests/fixtures/sysfs); "
          f"{n} collections")
    print(f"collection (collect + self-metrics + OTLP encode): {ms(full['collection'])} CPU "
          f"({full['points']} points, {full['bytes']} B OTLP)   goal < 10 ms")
    print(f"  of which: nvml {ms(full['nvml'])} (replay included), efa {ms(full['efa'])}, "
          f"power {ms(full['power'])}, OTLP encode {ms(full['encode'])}")
    print(f"/metrics render (per Prometheus scrape, not per collection): {ms(full['render'])} CPU")
    print(f"peak RSS: {rss_mb:.1f} MB   goal < 80 MB")
    host_cpu = host["collection"] + host["render"]
    print(f"EFA + hwmon only, collect + /metrics render: {ms(host_cpu)} CPU ({host['points']} points)")
    peer = node_exporter_peer(n)
    if peer is None:
        print("peer: node_exporter is not installed (Debian package prometheus-node-exporter); no ratio")
    else:
        ne_cpu, ne_rss, ne_lines = peer
        print(f"peer node_exporter (hwmon + infiniband collectors, same sysfs fixture): "
              f"{ne_cpu * 1e3:.2f} ms CPU per scrape ({ne_lines} samples), peak RSS {ne_rss:.1f} MB")
        print(f"ratio agent/node_exporter CPU per scrape (EFA + hwmon, collect + exposition): {host_cpu / ne_cpu:.2f}x"
              if ne_cpu > 0 else "ratio: node_exporter CPU below clock resolution; raise --collections")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
