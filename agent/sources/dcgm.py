"""Profiling fields NVML lacks, scraped from a dcgm-exporter's Prometheus page.

dcgm-exporter (NVIDIA's DCGM Prometheus exporter, usually :9400/metrics) samples the GPU's
performance counters. We map the fields below into the catalog and ignore the rest (NVML already
gives clocks, temperatures, power and memory):

    DCGM_FI_PROF_GR_ENGINE_ACTIVE     -> hw.gpu.engine.active{engine="graphics"}   (ratio)
    DCGM_FI_PROF_PIPE_TENSOR_ACTIVE   -> hw.gpu.engine.active{engine="tensor"}     (ratio)
    DCGM_FI_PROF_DRAM_ACTIVE          -> hw.gpu.engine.active{engine="dram"}       (ratio)
    DCGM_FI_PROF_PCIE_TX_BYTES/RX     -> hw.gpu.pcie.throughput{direction}         (B/s)
    DCGM_FI_PROF_NVLINK_TX_BYTES+RX   -> hw.gpu.nvlink.throughput                  (B/s)
    DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL   (fallback when the PROF NVLink fields are not enabled)

The exporter types PCIE_*_BYTES and NVLINK_BANDWIDTH_TOTAL as counters, but they are rates
(NVIDIA's field docs say "bytes per second"), so they are gauges here. NVLINK_BANDWIDTH_TOTAL has
no documented unit; measurements published against nvidia-smi show MB/s, which we use.

Labels: gpu -> chip, UUID (or uuid) -> uuid, modelName -> model, vendor "nvidia". Hostname /
hostname, device, pci_bus_id, driver version and pod labels are dropped: node identity comes from
the agent's config. Per-MIG-instance rows (GPU_I_ID) are skipped because they would collide with
the whole-GPU series; a GPU seen twice (one row per pod sharing it) is reported once.

The page is parsed with prometheus_client's own text parser rather than a hand-written one.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from agent.sources.base import Point, point

MAX_PAGE_BYTES = 32 * 1024 * 1024  # a full dcgm-exporter page for 8 GPUs is ~100 KB

_ENGINES = {
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "graphics",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "tensor",
    "DCGM_FI_PROF_DRAM_ACTIVE": "dram",
}
_PCIE = {"DCGM_FI_PROF_PCIE_TX_BYTES": "transmit", "DCGM_FI_PROF_PCIE_RX_BYTES": "receive"}
_NVLINK_PROF = ("DCGM_FI_PROF_NVLINK_TX_BYTES", "DCGM_FI_PROF_NVLINK_RX_BYTES")
_NVLINK_TOTAL = "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"
_NVLINK_TOTAL_SCALE = 1e6  # MB/s -> B/s
_WANTED = {*_ENGINES, *_PCIE, *_NVLINK_PROF, _NVLINK_TOTAL}


class DcgmError(RuntimeError):
    pass


def _chip_order(chip: str) -> tuple[int, str]:
    return (int(chip), "") if chip.isdigit() else (1 << 30, chip)


def _metric_name(line: str) -> str:
    if line.startswith("#"):
        parts = line.split(None, 3)
        return parts[2] if len(parts) > 2 else ""
    return line.split("{", 1)[0].split(" ", 1)[0]


def parse(text: str) -> list[Point]:
    """dcgm-exporter text exposition -> catalog points."""
    # Only the wanted fields go through the (accurate but slow) parser: a page has ~40 fields.
    text = "\n".join(line for line in text.splitlines() if _metric_name(line) in _WANTED) + "\n"
    # (field, chip) -> (value, labels) ; first row wins (pods sharing a GPU repeat it)
    rows: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        # The parser appends "_total" to counter sample names; the family keeps DCGM's name.
        if family.name not in _WANTED:
            continue
        for sample in family.samples:
            labels = sample.labels
            if "GPU_I_ID" in labels or "gpu" not in labels:
                continue
            chip = labels["gpu"]
            rows.setdefault((family.name, chip), (float(sample.value), {
                "chip": chip,
                "uuid": labels.get("UUID") or labels.get("uuid", ""),
                "vendor": "nvidia",
                "model": labels.get("modelName", ""),
            }))
    points: list[Point] = []
    nvlink_prof: dict[str, float] = {}
    for (field, chip), (value, ids) in sorted(rows.items(), key=lambda kv: (kv[0][0], _chip_order(kv[0][1]))):
        if field in _ENGINES:
            points.append(point("hw.gpu.engine.active", value, engine=_ENGINES[field], **ids))
        elif field in _PCIE:
            points.append(point("hw.gpu.pcie.throughput", value, direction=_PCIE[field], **ids))
        elif field in _NVLINK_PROF:
            nvlink_prof[chip] = nvlink_prof.get(chip, 0.0) + value
    ids_by_chip = {chip: ids for (_, chip), (_, ids) in rows.items()}
    for chip in sorted(ids_by_chip, key=_chip_order):
        if chip in nvlink_prof:
            value = nvlink_prof[chip]
        elif (_NVLINK_TOTAL, chip) in rows:
            value = rows[(_NVLINK_TOTAL, chip)][0] * _NVLINK_TOTAL_SCALE
        else:
            continue
        points.append(point("hw.gpu.nvlink.throughput", value, **ids_by_chip[chip]))
    return points


class DcgmSource:
    name = "dcgm"

    def __init__(self, url: str | None, timeout: float = 2.0):
        self.url = url or ""
        self.timeout = timeout

    def supported(self) -> tuple[bool, str]:
        if not self.url:
            return False, "dcgm_exporter_url is not set"
        return True, ""

    def fetch(self) -> str:
        request = urllib.request.Request(self.url, headers={"Accept": "text/plain"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read(MAX_PAGE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise DcgmError(f"dcgm-exporter at {self.url} answered HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DcgmError(f"dcgm-exporter at {self.url} unreachable: {reason}") from exc
        if len(body) > MAX_PAGE_BYTES:
            raise DcgmError(f"dcgm-exporter page at {self.url} exceeds {MAX_PAGE_BYTES} bytes")
        return body.decode("utf-8", errors="replace")

    def collect(self) -> list[Point]:
        text = self.fetch()
        try:
            return parse(text)
        except ValueError as exc:  # prometheus_client's parser raises ValueError on bad lines
            raise DcgmError(f"dcgm-exporter page at {self.url} is not Prometheus text: {exc}") from exc
