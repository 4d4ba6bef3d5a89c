"""Agent sources: one module per hardware source, all behind agent.sources.base.Source.

build_sources(config) is the registry: it constructs every enabled source with the roots,
commands and handles from the agent's config. A source module is imported only when that source
is enabled, so a node without pynvml never needs it and a new source is one entry in FACTORIES.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from agent.sources.base import Source

if TYPE_CHECKING:
    from agent.config import AgentConfig


def _nvml(cfg: "AgentConfig") -> Source:
    from agent.sources.nvml import NvmlSource
    # The kernel log and NVML events report the same XIDs with the same labels: NVML's event
    # thread runs only where the xid source cannot read the kernel log, so nothing counts twice.
    kmsg_readable = cfg.enabled("xid") and os.access(cfg.kmsg_path, os.R_OK)
    return NvmlSource(nvml=None, xid_events=not kmsg_readable)   # None: imports pynvml itself


def _dcgm(cfg: "AgentConfig") -> Source:
    from agent.sources.dcgm import DcgmSource
    return DcgmSource(cfg.dcgm_exporter_url or None, timeout=cfg.dcgm_timeout)


def _neuron(cfg: "AgentConfig") -> Source:
    from agent.sources.neuron import NeuronSource
    return NeuronSource(command=list(cfg.neuron_monitor_command))


def _efa(cfg: "AgentConfig") -> Source:
    from agent.sources.efa import EfaSource
    return EfaSource(sysfs_root=cfg.sysfs_root)


def _power(cfg: "AgentConfig") -> Source:
    from agent.sources.power import PowerSource
    return PowerSource(sysfs_root=cfg.sysfs_root, ipmitool_command=list(cfg.ipmitool_command))


def _xid(cfg: "AgentConfig", nvml: Any = None) -> Source:
    from agent.sources.xid import XidSource
    # The dedupe state lives under state_dir so a restarted agent never counts a line twice.
    # With the NVML source's handle, bus ids map to NVML's own GPU index and uuid exactly.
    return XidSource(kmsg_path=cfg.kmsg_path, procfs_root=cfg.procfs_root,
                     state_dir=os.path.join(cfg.state_dir, "xid"), nvml=nvml)


# Order is the order sources are collected and reported in.
FACTORIES: dict[str, Callable[["AgentConfig"], Source]] = {
    "nvml": _nvml, "dcgm": _dcgm, "neuron": _neuron, "efa": _efa, "power": _power, "xid": _xid,
}


def build_sources(config: "AgentConfig") -> list[Source]:
    """Every enabled source, constructed from the config (supported() is asked later)."""
    sources: list[Source] = []
    for name, factory in FACTORIES.items():
        if not config.enabled(name):
            continue
        if name == "xid":
            nvml_src = next((s for s in sources if s.name == "nvml"), None)
            sources.append(_xid(config, getattr(nvml_src, "nvml", None)))
        else:
            sources.append(factory(config))
    return sources
