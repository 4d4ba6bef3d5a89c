"""Build the Grafana dashboards from code: `.venv/bin/python dashboards/build.py [--check]`.

Why code and not hand-kept JSON: every metric name comes from agent/catalog.yaml (M() below), so
renaming a metric in the catalog renames it in every panel; panels share one set of helpers,
template variables and thresholds, so the eight dashboards stay consistent. The JSON itself is
produced by Grafana Labs' Foundation SDK (grafana-foundation-sdk: typed builders generated from
Grafana's own schemas, with its grid layout) rather than by hand-written dicts, so field names
and nesting match what Grafana expects. The SDK is a build-time (test extra) dependency only:
the generated JSON is committed under dashboards/json/ (Grafana provisions it from files, and
`shopfloor dashboards push` uploads it); tests/dashboards checks it equals a fresh build.

Queries use only these Grafana variables: $cluster, $vendor, $node, $chip (multi-value, "All"),
$datasource, $__rate_interval, $__interval and $__range. tests/dashboards substitutes them and
runs every query against a collector holding a simulated fleet.

The capacity dashboard answers weeks-to-months questions with long-range PromQL over the raw
series and a large minimum step (1h), using *_over_time functions; Grafana then asks the
collector for at most a few thousand points per series.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "json"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from grafana_foundation_sdk.builders import common as gcommon  # noqa: E402
from grafana_foundation_sdk.builders import dashboard as gdash  # noqa: E402
from grafana_foundation_sdk.builders import prometheus as gprom  # noqa: E402
from grafana_foundation_sdk.builders import stat as gstat  # noqa: E402
from grafana_foundation_sdk.builders import table as gtable  # noqa: E402
from grafana_foundation_sdk.builders import timeseries as gts  # noqa: E402
from grafana_foundation_sdk.cog.encoder import JSONEncoder  # noqa: E402
from grafana_foundation_sdk.models import common as mcommon  # noqa: E402
from grafana_foundation_sdk.models import dashboard as mdash  # noqa: E402
from grafana_foundation_sdk.models import prometheus as mprom  # noqa: E402

from agent.catalog import catalog  # noqa: E402

DS = mdash.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["shopfloor"]


def M(otel_name: str) -> str:
    """A metric's Prometheus name, from the catalog (the only way this file names a metric)."""
    return catalog().prom(otel_name)


# ----------------------------------------------------------------------------- selectors
CHIP_SEL = 'cluster=~"$cluster", vendor=~"$vendor", node=~"$node", chip=~"$chip"'
NODE_SEL = 'cluster=~"$cluster", node=~"$node"'
FLEET_SEL = 'cluster=~"$cluster", vendor=~"$vendor"'
CLUSTER_SEL = 'cluster=~"$cluster"'
# The remediation layer labels a cordon with the chip's cluster/node/rack/chip/uuid and backend,
# not vendor or model, so cordon panels filter on cluster only.
CORDON_SEL = CLUSTER_SEL


_OPS = (("!~", "!~"), ("~", "=~"), ("!", "!="))


def sel(otel_name: str, selector: str = CHIP_SEL, **matchers: str) -> str:
    """A selector: the variables' matchers plus label=value (value "~re", "!v" or "!~re" for =~ != !~)."""
    parts = [selector] if selector else []
    for label, value in matchers.items():
        op = "="
        for prefix, promql_op in _OPS:
            if value.startswith(prefix):
                op, value = promql_op, value[len(prefix):]
                break
        parts.append(f'{label}{op}"{value}"')
    return f"{M(otel_name)}{{{', '.join(parts)}}}"


# ----------------------------------------------------------------------------- variables
def _query_var(name: str, label: str, query: str) -> gdash.QueryVariable:
    return (gdash.QueryVariable(name).label(label).datasource(DS)
            .query({"query": query, "refId": f"{name}-variable"})
            .refresh(mdash.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(mdash.VariableSort.NUMERICAL_ASC if name == "chip" else mdash.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(mdash.VariableOption(selected=True, text=["All"], value=["$__all"])))


def variables(*names: str, fixed: str = "") -> list:
    """The data source picker plus label variables, each filtered by the ones before it.

    fixed: matchers every variable query carries (the Trainium dashboard pins vendor="aws").
    "host" is a node variable for views without accelerators (found through the agent's metric).
    """
    out: list = [gdash.DatasourceVariable("datasource").label("Data source").type("prometheus")
                 .current(mdash.VariableOption(selected=True, text="Shopfloor", value="shopfloor"))]
    before: list[str] = [fixed] if fixed else []
    for n in names:
        metric = M("shopfloor.agent.scrape.success") if n == "host" else M("hw.gpu.info")
        label = "node" if n == "host" else n
        filters = ", ".join(before)
        query = f"label_values({metric}{{{filters}}}, {label})" if filters else f"label_values({metric}, {label})"
        out.append(_query_var(label, label.capitalize(), query))
        before.append(f'{label}=~"${label}"')
    return out


# ----------------------------------------------------------------------------- panels
def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> gprom.Dataquery:
    q = (gprom.Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref).datasource(DS)
         .editor_mode(mprom.QueryEditorMode.CODE))
    return q.instant() if instant else q.range()


def thresholds(*steps: tuple[float | None, str]) -> list[tuple[float | None, str]]:
    return list(steps)


def _thresholds(steps) -> gdash.ThresholdsConfig:
    return (gdash.ThresholdsConfig().mode(mdash.ThresholdsMode.ABSOLUTE)
            .steps([mdash.Threshold(value=v, color=c) for v, c in steps]))


GREEN_ONLY = thresholds((None, "green"))
ANY_IS_BAD = thresholds((None, "green"), (1, "red"))
TEMP_C = thresholds((None, "green"), (80, "orange"), (90, "red"))
UTIL = thresholds((None, "blue"), (0.3, "green"))
FRACTION_OF_LIMIT = thresholds((None, "green"), (0.9, "orange"), (0.97, "red"))


# Data links from any per-chip series to the chip detail dashboard, keeping the time range.
CHIP_LINK = ("Chip detail: ${__field.labels.node} chip ${__field.labels.chip}",
             "/d/shopfloor-chip/?var-cluster=${__field.labels.cluster}&var-node=${__field.labels.node}"
             "&var-chip=${__field.labels.chip}&${__url_time_range}")
CHIP_LINK_TABLE = ("Chip detail: ${__data.fields.node} chip ${__data.fields.chip}",
                   "/d/shopfloor-chip/?var-cluster=${__data.fields.cluster}&var-node=${__data.fields.node}"
                   "&var-chip=${__data.fields.chip}&${__url_time_range}")


def panel(kind: str, title: str, targets: list[gprom.Dataquery], *, unit: str = "short", w: int = 12, h: int = 8,
          description: str = "", th=GREEN_ONLY, minv: float | None = None, maxv: float | None = None,
          decimals: int | None = None, stack: bool = False):
    """One panel (timeseries, stat or table) as a Grafana Foundation SDK builder."""
    if kind == "timeseries":
        b = (gts.Panel()
             .legend(gcommon.VizLegendOptions().display_mode(mcommon.LegendDisplayMode.TABLE)
                     .placement(mcommon.LegendPlacement.BOTTOM).show_legend(True).calcs(["lastNotNull", "max"]))
             .tooltip(gcommon.VizTooltipOptions().mode(mcommon.TooltipDisplayMode.MULTI)
                      .sort(mcommon.SortOrder.DESCENDING))
             .draw_style(mcommon.GraphDrawStyle.LINE).line_width(1).fill_opacity(10 if stack else 0)
             .show_points(mcommon.VisibilityMode.NEVER).span_nulls(False)
             .stacking(gcommon.StackingConfig().mode(mcommon.StackingMode.NORMAL if stack else mcommon.StackingMode.NONE)
                       .group("A"))
             .thresholds_style(gcommon.GraphThresholdsStyleConfig().mode(
                 mcommon.GraphTresholdsStyleMode.OFF if th is GREEN_ONLY else mcommon.GraphTresholdsStyleMode.LINE))
             .color_scheme(gdash.FieldColor().mode(mdash.FieldColorModeId.PALETTE_CLASSIC)))
    elif kind == "stat":
        b = (gstat.Panel()
             .reduce_options(gcommon.ReduceDataOptions().calcs(["lastNotNull"]).values(False).fields(""))
             .color_mode(mcommon.BigValueColorMode.BACKGROUND).graph_mode(mcommon.BigValueGraphMode.AREA)
             .color_scheme(gdash.FieldColor().mode(mdash.FieldColorModeId.THRESHOLDS)))
    elif kind == "table":
        b = gtable.Panel().show_header(True)
        targets = [t.format(mprom.PromQueryFormat.TABLE) for t in targets]   # one row per series
    else:
        raise ValueError(f"unknown panel kind {kind!r}")
    b = (b.title(title).description(description).datasource(DS).unit(unit).span(w).height(h)
         .thresholds(_thresholds(th)))
    for t in targets:
        b = b.with_target(t)
    if minv is not None:
        b = b.min(minv)
    if maxv is not None:
        b = b.max(maxv)
    if decimals is not None:
        b = b.decimals(decimals)
    exprs = [t.build().expr for t in targets]
    legends = " ".join(t.build().legend_format or "" for t in targets)
    if (kind == "table" and any("topk" in e or "info" in e for e in exprs)) or \
            ("{{node}}" in legends and "{{chip}}" in legends):
        link_title, url = CHIP_LINK_TABLE if kind == "table" else CHIP_LINK
        b = b.data_links([gdash.DashboardLink(link_title).url(url).target_blank(False)])
    return b


def ts(title, *targets, **kw):
    return panel("timeseries", title, list(targets), **kw)


def stat(title, expr, *, w=4, h=4, **kw):
    return panel("stat", title, [target(expr, instant=True)], w=w, h=h, **kw)


def row(title: str) -> gdash.Row:
    return gdash.Row(title).collapsed(False)


def dashboard(uid: str, title: str, description: str, items: list, vars_: list, *, time_from: str = "now-6h",
              refresh: str = "1m", panel_interval: str | None = None) -> dict:
    """A dashboard: rows and panels in reading order, laid out left to right by the SDK."""
    b = (gdash.Dashboard(title).uid(uid).description(description).tags(TAGS).timezone("utc").editable()
         .tooltip(mdash.DashboardCursorSync.CROSSHAIR).time(time_from, "now").refresh(refresh).version(1)
         .variables(vars_)
         .link(gdash.DashboardLink("Shopfloor").type(mdash.DashboardLinkType.DASHBOARDS).tags(TAGS)
               .as_dropdown(True).include_vars(True).keep_time(True)))
    for pid, item in enumerate(items, 1):
        item = item.id(pid)
        if isinstance(item, gdash.Row):
            b = b.with_row(item)
        else:
            b = b.with_panel(item.interval(panel_interval) if panel_interval else item)
    return json.loads(json.dumps(b.build(), cls=JSONEncoder))


RATE = "$__rate_interval"
# XIDs after which the chip needs a reset or the node a reboot (shared/reference/xid.md).
FATAL_XIDS = "48|79|94|95|119|120|140"


# ----------------------------------------------------------------------------- the dashboards
def fleet_overview() -> dict:
    state = M("shopfloor.health.state")
    p = [
        row("Now"),
        stat("Chips reporting", f"count(group by (cluster, node, chip) ({sel('hw.gpu.info', FLEET_SEL)}))",
             description="Accelerators whose agent reported in the last 5 minutes."),
        stat("Chips failing or degraded",
             f'sum({state}{{{FLEET_SEL}, state=~"failing|degraded"}}) or vector(0)',
             th=ANY_IS_BAD, description="Health layer verdicts (shopfloor health)."),
        stat("Chips cordoned", f"sum({sel('shopfloor.remediation.cordoned', CORDON_SEL)}) or vector(0)",
             th=thresholds((None, "green"), (1, "orange"))),
        stat("Fleet utilization", f"avg({sel('hw.gpu.utilization', FLEET_SEL)})", unit="percentunit",
             th=UTIL, minv=0, maxv=1),
        stat("Accelerator power", f"sum({sel('hw.power', FLEET_SEL)})", unit="watt", decimals=1),
        stat("Chips with fatal errors",
             f'count(group by (cluster, node, chip) ({sel("hw.gpu.xid.errors", FLEET_SEL, xid="~" + FATAL_XIDS)} > 0'
             f' or increase({sel("hw.gpu.ecc.errors", FLEET_SEL, type="uncorrected")}[24h]) > 0)) or vector(0)',
             th=ANY_IS_BAD, decimals=0,
             description="Chips with a fatal XID (48, 79, 94, 95, 119, 120, 140) since their node's last boot, "
                         "or an uncorrectable ECC error in the last 24 h."),
        row("By cluster and vendor"),
        ts("Utilization by cluster and vendor",
           target(f"avg by (cluster, vendor) ({sel('hw.gpu.utilization', FLEET_SEL)})", "{{cluster}} {{vendor}}"),
           unit="percentunit", minv=0, maxv=1),
        ts("Power by cluster and vendor",
           target(f"sum by (cluster, vendor) ({sel('hw.power', FLEET_SEL)})", "{{cluster}} {{vendor}}"),
           unit="watt", stack=True),
        ts("Chips by health state",
           target(f"sum by (state) ({state}{{{FLEET_SEL}}})", "{{state}}"), stack=True, decimals=0),
        ts("Chips reporting by cluster and model",
           target(f"count by (cluster, model) ({sel('hw.gpu.info', FLEET_SEL)})", "{{cluster}} {{model}}"),
           decimals=0),
        row("Errors"),
        ts("XID errors by code (since boot)",
           target(f"sum by (xid) ({sel('hw.gpu.xid.errors', FLEET_SEL)})", "XID {{xid}}"), decimals=0,
           description="XID counts since each node's boot. A chip's XID series appears with its first "
                       "event, so the count itself (not increase(), which needs an earlier sample) is shown."),
        ts("ECC errors by type and memory",
           target(f'sum by (vendor, memory, type) (increase({sel("hw.gpu.ecc.errors", FLEET_SEL, scope="!aggregate")}[{RATE}]))',
                  "{{vendor}} {{memory}} {{type}}"), decimals=0),
        ts("Chips with a pending or failed row remap",
           target(f"sum by (cluster) ({sel('hw.gpu.row_remap.pending', FLEET_SEL)})", "{{cluster}} pending"),
           target(f"sum by (cluster) ({sel('hw.gpu.row_remap.failure', FLEET_SEL)})", "{{cluster}} failed", "B"),
           decimals=0, th=ANY_IS_BAD),
        ts("Trainium execution errors by type",
           target(f"sum by (type) (rate({sel('hw.neuron.execution.errors', FLEET_SEL)}[{RATE}]))", "{{type}}"),
           unit="cps"),
        row("Telemetry pipeline"),
        ts("Agent sources failing",
           target(f"count by (source) ({sel('shopfloor.agent.scrape.success', CLUSTER_SEL)} == 0) or "
                  f"count by (source) ({sel('shopfloor.agent.scrape.success', CLUSTER_SEL)}) * 0", "{{source}}"),
           decimals=0, th=ANY_IS_BAD),
        ts("Agent spool (bytes waiting)",
           target(f"sum by (cluster) ({sel('shopfloor.agent.spool.usage', CLUSTER_SEL)})", "{{cluster}}"),
           unit="bytes"),
    ]
    return dashboard("shopfloor-fleet", "Shopfloor / Fleet overview",
                     "Chips by state, utilization, power and errors across the fleet, by cluster and vendor.",
                     p, variables("cluster", "vendor"))


def node_detail() -> dict:
    p = [
        row("Accelerators"),
        ts("Utilization", target(f"{sel('hw.gpu.utilization')}", "{{node}} chip {{chip}}"),
           unit="percentunit", minv=0, maxv=1),
        ts("Device memory used",
           target(f"{sel('hw.gpu.memory.usage')} / {sel('hw.gpu.memory.limit')}", "{{node}} chip {{chip}}"),
           unit="percentunit", minv=0, maxv=1, th=FRACTION_OF_LIMIT),
        ts("Memory controller utilization", target(f"{sel('hw.gpu.memory_controller.utilization')}",
                                                   "{{node}} chip {{chip}}"), unit="percentunit", minv=0, maxv=1),
        ts("Power", target(f"{sel('hw.power')}", "{{node}} chip {{chip}}"), unit="watt"),
        ts("Temperature", target(f"{sel('hw.temperature')}", "{{node}} chip {{chip}} {{sensor}}"),
           unit="celsius", th=TEMP_C),
        ts("SM clock", target(f"{sel('hw.gpu.clock', clock='sm')}", "{{node}} chip {{chip}}"),
           unit="hertz"),
        ts("Throttle reasons active",
           target(f'{sel("hw.gpu.clock.event.active", reason="!idle")} == 1',
                  "{{node}} chip {{chip}} {{reason}}"), decimals=0),
        ts("XID errors (since boot)", target(f"{sel('hw.gpu.xid.errors')}", "{{node}} chip {{chip}} XID {{xid}}"),
           decimals=0, th=ANY_IS_BAD),
        ts("ECC errors (volatile)",
           target(f'increase({sel("hw.gpu.ecc.errors", scope="volatile")}[{RATE}])',
                  "{{node}} chip {{chip}} {{memory}} {{type}}"), decimals=0),
        row("Host"),
        ts("Host power", target(f"{sel('hw.host.power', NODE_SEL)}", "{{node}} {{sensor}}"), unit="watt"),
        ts("Host temperatures", target(f"{sel('hw.host.temperature', NODE_SEL)}", "{{node}} {{sensor}}"),
           unit="celsius", th=TEMP_C),
        ts("Fans", target(f"{sel('hw.fan.speed', NODE_SEL)}", "{{node}} {{sensor}}"), unit="rotrpm"),
        ts("EFA throughput",
           target(f'sum by (node, device) (rate({sel("hw.efa.port.stat", NODE_SEL, counter="~tx_bytes|rx_bytes")}[{RATE}]))',
                  "{{node}} {{device}}"), unit="Bps"),
        row("Agent"),
        ts("Source collection success", target(f"{sel('shopfloor.agent.scrape.success', NODE_SEL)}", "{{node}} {{source}}"),
           minv=0, maxv=1, decimals=0),
        ts("Sources with hardware present", target(f"{sel('shopfloor.agent.source.supported', NODE_SEL)}",
                                                   "{{node}} {{source}}"), minv=0, maxv=1, decimals=0,
           description="0 means the source found no hardware on this node (not an error)."),
        ts("Source collection time", target(f"{sel('shopfloor.agent.scrape.duration', NODE_SEL)}", "{{node}} {{source}}"),
           unit="s"),
        ts("Export requests by outcome",
           target(f"sum by (node, outcome) (rate({sel('shopfloor.agent.export.requests', NODE_SEL)}[{RATE}]))",
                  "{{node}} {{outcome}}"), unit="reqps"),
        ts("Spool", target(f"{sel('shopfloor.agent.spool.usage', NODE_SEL)}", "{{node}} bytes"),
           target(f"{sel('shopfloor.agent.spool.batches', NODE_SEL)}", "{{node}} batches", "B"), unit="bytes"),
        ts("Spool batches dropped (spool full)",
           target(f"increase({sel('shopfloor.agent.spool.dropped', NODE_SEL)}[{RATE}])", "{{node}}"),
           decimals=0, th=ANY_IS_BAD),
    ]
    return dashboard("shopfloor-node", "Shopfloor / Node detail",
                     "Everything one node reports: its accelerators, host power and thermals, network and agent.",
                     p, variables("cluster", "vendor", "node", "chip"))


def chip_detail() -> dict:
    p = [
        row("Identity and health"),
        panel("table", "Chip", [target(f"{sel('hw.gpu.info')}", instant=True)], w=16, h=5),
        stat("Health risk", f"max({sel('shopfloor.health.risk')})", unit="percentunit", w=4, h=5,
             th=thresholds((None, "green"), (0.2, "orange"), (0.5, "red"))),
        stat("Recovery action", f"max({sel('hw.gpu.recovery_action')})", w=4, h=5, th=ANY_IS_BAD,
             description="0 none, 1 GPU reset, 2 node reboot, 3 drain P2P, 4 drain and reset (NVML field 230)."),
        row("Memory reliability"),
        ts("ECC errors (cumulative)",
           target(f"{sel('hw.gpu.ecc.errors')}", "chip {{chip}} {{memory}} {{type}} {{scope}}"), decimals=0),
        ts("Correctable ECC rate",
           target(f'rate({sel("hw.gpu.ecc.errors", type="corrected", scope="!aggregate")}[{RATE}])',
                  "chip {{chip}} {{memory}}"), unit="cps",
           description="A rate 10-100x the chip's baseline precedes most uncorrectable HBM errors."),
        ts("Rows remapped", target(f"{sel('hw.gpu.row_remap.rows')}", "chip {{chip}} {{type}}"), decimals=0),
        ts("Row remap pending / failed",
           target(f"{sel('hw.gpu.row_remap.pending')}", "chip {{chip}} pending"),
           target(f"{sel('hw.gpu.row_remap.failure')}", "chip {{chip}} failed", "B"), decimals=0, th=ANY_IS_BAD),
        ts("Retired pages", target(f"{sel('hw.gpu.retired_pages')}", "chip {{chip}} {{cause}}"),
           target(f"{sel('hw.gpu.retired_pages.pending')}", "chip {{chip}} pending", "B"), decimals=0),
        ts("XID errors", target(f"{sel('hw.gpu.xid.errors')}", "chip {{chip}} XID {{xid}}"), decimals=0),
        row("Interconnect"),
        ts("PCIe replays", target(f"rate({sel('hw.gpu.pcie.replays')}[{RATE}])", "chip {{chip}}"), unit="cps"),
        ts("NVLink errors", target(f"sum by (chip, type) (rate({sel('hw.gpu.nvlink.errors')}[{RATE}]))",
                                   "chip {{chip}} {{type}}"), unit="cps"),
        ts("NVLinks up", target(f"sum by (chip) ({sel('hw.gpu.nvlink.up')})", "chip {{chip}}"), decimals=0),
        ts("PCIe and NVLink throughput",
           target(f"{sel('hw.gpu.pcie.throughput')}", "chip {{chip}} PCIe {{direction}}"),
           target(f"{sel('hw.gpu.nvlink.throughput')}", "chip {{chip}} NVLink", "B"), unit="Bps"),
        row("Thermal and power"),
        ts("Temperature vs slowdown threshold",
           target(f"{sel('hw.temperature')}", "chip {{chip}} {{sensor}}"),
           target(f'{sel("hw.temperature.limit", threshold="slowdown")}', "chip {{chip}} slowdown", "B"),
           unit="celsius", th=TEMP_C),
        ts("Power vs limit", target(f"{sel('hw.power')}", "chip {{chip}} power"),
           target(f"{sel('hw.power.limit')}", "chip {{chip}} limit", "B"), unit="watt"),
        ts("Clock events", target(f'{sel("hw.gpu.clock.event.active", reason="!idle")}',
                                  "chip {{chip}} {{reason}}"), decimals=0),
        ts("Engine activity (DCGM)", target(f"{sel('hw.gpu.engine.active')}", "chip {{chip}} {{engine}}"),
           unit="percentunit", minv=0, maxv=1),
    ]
    return dashboard("shopfloor-chip", "Shopfloor / Chip detail",
                     "All reliability counters of one accelerator over time.",
                     p, variables("cluster", "vendor", "node", "chip"), time_from="now-7d", refresh="5m")


def power_thermals() -> dict:
    power, limit = sel("hw.power", FLEET_SEL), sel("hw.power.limit", FLEET_SEL)
    p = [
        row("Racks"),
        stat("Fleet power headroom", f"1 - sum({power}) / sum({limit})", unit="percentunit",
             th=thresholds((None, "red"), (0.03, "orange"), (0.1, "green")), w=6),
        stat("Hottest GPU", f'max({sel("hw.temperature", FLEET_SEL, sensor="gpu")})', unit="celsius",
             th=TEMP_C, w=6),
        stat("Chips thermally throttled",
             f'count(max by (cluster, node, chip) ({sel("hw.gpu.clock.event.active", FLEET_SEL, reason="~sw_thermal|hw_thermal|hw_slowdown")}) == 1) or vector(0)',
             th=ANY_IS_BAD, w=6),
        stat("Host power (DCMI)", f'sum({sel("hw.host.power", CLUSTER_SEL, sensor="dcmi_instantaneous")})',
             unit="watt", w=6),
        ts("Accelerator power by rack", target(f"sum by (cluster, rack) ({power})", "{{cluster}}/{{rack}}"),
           unit="watt"),
        ts("Power headroom by rack (limit - draw)",
           target(f"sum by (cluster, rack) ({limit}) - sum by (cluster, rack) ({power})", "{{cluster}}/{{rack}}"),
           unit="watt", th=thresholds((None, "red"), (500, "green"))),
        ts("Rack power as a fraction of limits",
           target(f"sum by (cluster, rack) ({power}) / sum by (cluster, rack) ({limit})", "{{cluster}}/{{rack}}"),
           unit="percentunit", th=FRACTION_OF_LIMIT),
        ts("Host power by rack (DCMI)",
           target(f'sum by (cluster, rack) ({sel("hw.host.power", CLUSTER_SEL, sensor="dcmi_instantaneous")})',
                  "{{cluster}}/{{rack}}"), unit="watt"),
        row("Thermals"),
        ts("Hottest GPU per rack", target(f'max by (cluster, rack) ({sel("hw.temperature", FLEET_SEL, sensor="gpu")})',
                                          "{{cluster}}/{{rack}}"), unit="celsius", th=TEMP_C),
        ts("Smallest thermal margin per rack (slowdown - temperature)",
           target(f'min by (cluster, rack) ({sel("hw.temperature.limit", FLEET_SEL, sensor="gpu", threshold="slowdown")}'
                  f' - ignoring (threshold) {sel("hw.temperature", FLEET_SEL, sensor="gpu")})', "{{cluster}}/{{rack}}"),
           unit="celsius", th=thresholds((None, "red"), (5, "orange"), (15, "green"))),
        ts("Host sensors over their max",
           target(f'max by (cluster, rack) ({sel("hw.host.temperature", CLUSTER_SEL)} - ignoring (threshold) '
                  f'{sel("hw.host.temperature.limit", CLUSTER_SEL, threshold="max")})', "{{cluster}}/{{rack}}"),
           unit="celsius", th=thresholds((None, "green"), (0, "red")),
           description="Highest host sensor reading minus its hwmon max, per rack: above 0 is over the limit."),
        ts("Host energy as power (RAPL, hwmon)",
           target(f"sum by (cluster, rack, sensor) (rate({sel('hw.host.energy', CLUSTER_SEL)}[{RATE}]))",
                  "{{cluster}}/{{rack}} {{sensor}}"), unit="watt"),
        ts("Fan speed (min per rack)", target(f"min by (cluster, rack) ({sel('hw.fan.speed', CLUSTER_SEL)})",
                                              "{{cluster}}/{{rack}}"), unit="rotrpm"),
        ts("Energy per rack", target(f"sum by (cluster, rack) (rate({sel('hw.energy', FLEET_SEL)}[{RATE}]))",
                                     "{{cluster}}/{{rack}}"), unit="watt",
           description="Accelerator energy counters as average power over the interval."),
        ts("Power throttling", target(f'count by (cluster, reason) ({sel("hw.gpu.clock.event.active", FLEET_SEL, reason="~sw_power_cap|hw_power_brake")} == 1)',
                                      "{{cluster}} {{reason}}"), decimals=0),
    ]
    return dashboard("shopfloor-power", "Shopfloor / Power and thermals",
                     "Power per rack with headroom against limits, temperatures against their thresholds.",
                     p, variables("cluster", "vendor"))


def efa_network() -> dict:
    def c(counter_re: str) -> str:
        return sel("hw.efa.port.stat", NODE_SEL, counter="~" + counter_re)
    p = [
        row("Ports"),
        stat("Ports down", f"count({sel('hw.network.up', NODE_SEL)} == 0) or vector(0)", th=ANY_IS_BAD, w=6),
        stat("Ports up", f"count({sel('hw.network.up', NODE_SEL)} == 1) or vector(0)", w=6),
        stat("Fabric throughput", f"sum(rate({c('tx_bytes|rx_bytes')}[{RATE}]))", unit="Bps", w=6),
        stat("Unresponsive remotes (1h)", f"sum(increase({c('unresponsive_remote_events')}[1h])) or vector(0)",
             th=ANY_IS_BAD, w=6, decimals=0),
        ts("Throughput by node", target(f"sum by (node, counter) (rate({c('tx_bytes|rx_bytes')}[{RATE}]))",
                                        "{{node}} {{counter}}"), unit="Bps"),
        ts("Link utilization",
           target(f'sum by (node, device, port) (rate({c("tx_bytes")}[{RATE}])) / '
                  f'max by (node, device, port) ({sel("hw.network.bandwidth.limit", NODE_SEL)})', "{{node}} {{device}}"),
           unit="percentunit", th=FRACTION_OF_LIMIT),
        ts("Receive drops", target(f"sum by (node, device) (rate({c('rx_drops')}[{RATE}]))", "{{node}} {{device}}"),
           unit="pps"),
        ts("Retransmitted packets", target(f"sum by (node, device) (rate({c('retrans_pkts')}[{RATE}]))",
                                           "{{node}} {{device}}"), unit="pps"),
        ts("Retransmit timeouts and impaired connections",
           target(f"sum by (node, counter) (increase({c('retrans_timeout_events|impaired_remote_conn_events')}[{RATE}]))",
                  "{{node}} {{counter}}"), decimals=0),
        ts("Unresponsive remote events", target(f"sum by (node, device) (increase({c('unresponsive_remote_events')}[{RATE}]))",
                                                "{{node}} {{device}}"), decimals=0, th=ANY_IS_BAD),
        ts("Port state", target(f"{sel('hw.network.up', NODE_SEL)}", "{{node}} {{device}}/{{port}}"), minv=0, maxv=1,
           decimals=0),
        ts("Device command errors", target(f'sum by (node, device) (increase({sel("hw.efa.device.stat", NODE_SEL, counter="cmds_err")}[{RATE}]))',
                                           "{{node}} {{device}}"), decimals=0),
    ]
    return dashboard("shopfloor-efa", "Shopfloor / EFA network",
                     "EFA and InfiniBand ports: throughput, drops, retransmits and unresponsive remote peers.",
                     p, variables("cluster", "host"))


def trainium() -> dict:
    trn = 'cluster=~"$cluster", vendor="aws", node=~"$node", chip=~"$chip"'
    p = [
        row("Now"),
        stat("NeuronCore utilization", f"avg({sel('hw.neuroncore.utilization', trn)})", unit="percentunit",
             th=UTIL, w=6),
        stat("Execution errors (1h)", f"sum(increase({sel('hw.neuron.execution.errors', trn)}[1h])) or vector(0)",
             th=ANY_IS_BAD, w=6, decimals=0),
        stat("p99 latency", f'max({sel("hw.neuron.execution.latency", trn, percentile="p99")})', unit="s", w=6),
        stat("Trainium chips", f"count({sel('hw.gpu.info', trn)})", w=6),
        ts("NeuronCore utilization", target(f"avg by (node, chip) ({sel('hw.neuroncore.utilization', trn)})",
                                            "{{node}} chip {{chip}}"), unit="percentunit", minv=0, maxv=1),
        ts("Device memory used", target(f"{sel('hw.gpu.memory.usage', trn)}", "{{node}} chip {{chip}}"), unit="bytes"),
        ts("Execution errors by type", target(f"sum by (type) (rate({sel('hw.neuron.execution.errors', trn)}[{RATE}]))",
                                              "{{type}}"), unit="cps"),
        ts("Executions by outcome", target(f"sum by (status) (rate({sel('hw.neuron.executions', trn)}[{RATE}]))",
                                           "{{status}}"), unit="ops", stack=True),
        ts("Execution latency", target(f'max by (percentile) ({sel("hw.neuron.execution.latency", trn, percentile="~p50|p99|p100")})',
                                       "{{percentile}}"), unit="s"),
        ts("HBM and SRAM ECC", target(f"sum by (memory, type) (increase({sel('hw.gpu.ecc.errors', trn)}[{RATE}]))",
                                      "{{memory}} {{type}}"), decimals=0),
    ]
    return dashboard("shopfloor-trainium", "Shopfloor / Trainium",
                     "AWS Trainium: NeuronCore utilization, execution errors and outcomes, latency, memory ECC.",
                     p, variables("cluster", "node", "chip", fixed='vendor="aws"'))


def capacity() -> dict:
    day = "1d"
    p = [
        row("Weeks to months (long-range queries, step >= 1h)"),
        ts("Daily mean utilization by cluster",
           target(f"avg by (cluster) (avg_over_time({sel('hw.gpu.utilization', FLEET_SEL)}[{day}]))", "{{cluster}}"),
           unit="percentunit", minv=0, maxv=1),
        ts("Daily peak accelerator power by cluster",
           target(f"max_over_time(sum by (cluster) ({sel('hw.power', FLEET_SEL)})[{day}:1h])", "{{cluster}}"),
           unit="watt"),
        ts("Energy per day by cluster",
           target(f"sum by (cluster) (increase({sel('hw.energy', FLEET_SEL)}[{day}]))", "{{cluster}}"), unit="joule"),
        ts("Chips reporting by cluster and vendor",
           target(f"count by (cluster, vendor) (max_over_time({sel('hw.gpu.info', FLEET_SEL)}[{day}]))",
                  "{{cluster}} {{vendor}}"), decimals=0),
        ts("Device memory in use (daily mean, fleet)",
           target(f"sum by (cluster) (avg_over_time({sel('hw.gpu.memory.usage', FLEET_SEL)}[{day}]))"
                  f" / sum by (cluster) (avg_over_time({sel('hw.gpu.memory.limit', FLEET_SEL)}[{day}]))", "{{cluster}}"),
           unit="percentunit", minv=0, maxv=1),
        ts("Chip-days lost to cordons",
           target(f"sum by (cluster) (sum_over_time({sel('shopfloor.remediation.cordoned', CORDON_SEL)}[{day}:1h])) / 24",
                  "{{cluster}}"), decimals=1,
           description="Chips held cordoned, integrated over each day (hourly samples)."),
    ]
    # Grafana's minimum step of 1h keeps month-long ranges cheap.
    return dashboard("shopfloor-capacity", "Shopfloor / Capacity trends",
                     "Utilization, power, energy and lost capacity over weeks to months, for capacity planning.",
                     p, variables("cluster", "vendor"), time_from="now-30d", refresh="1h", panel_interval="1h")


def health() -> dict:
    risk = M("shopfloor.health.risk")
    p = [
        row("Now"),
        stat("Chips failing", f'sum({M("shopfloor.health.state")}{{{FLEET_SEL}, state="failing"}}) or vector(0)',
             th=ANY_IS_BAD, w=6),
        stat("Chips cordoned", f"sum({sel('shopfloor.remediation.cordoned', CORDON_SEL)}) or vector(0)",
             th=thresholds((None, "green"), (1, "orange")), w=6),
        stat("Cordon budgets tripped", f"sum({M('shopfloor.remediation.budget.tripped')}) or vector(0)",
             th=ANY_IS_BAD, w=6),
        stat("Decisions (24h)", f"sum(increase({M('shopfloor.remediation.decisions')}[24h])) or vector(0)",
             w=6, decimals=0),
        panel("table", "Highest risk chips",
              [target(f"topk(20, {risk}{{{CHIP_SEL}}})", instant=True)], unit="percentunit", w=12, h=10,
              th=thresholds((None, "green"), (0.2, "orange"), (0.5, "red"))),
        ts("Risk score, top 10 chips", target(f"topk(10, {risk}{{{CHIP_SEL}}})", "{{node}} chip {{chip}}"),
           unit="percentunit", minv=0, maxv=1, h=10, th=thresholds((None, "green"), (0.5, "red"))),
        ts("Chips by health state", target(f"sum by (state) ({M('shopfloor.health.state')}{{{FLEET_SEL}}})", "{{state}}"),
           stack=True, decimals=0),
        ts("Cordoned chips by backend",
           target(f"sum by (cluster, backend) ({sel('shopfloor.remediation.cordoned', CORDON_SEL)})",
                  "{{cluster}} {{backend}}"), decimals=0),
        ts("Remediation decisions",
           target(f"sum by (action, outcome) (increase({M('shopfloor.remediation.decisions')}[{RATE}]))",
                  "{{action}} {{outcome}}"), decimals=0),
        ts("Cordon budgets", target(f"{M('shopfloor.remediation.budget.tripped')}", "{{scope}}"), minv=0, maxv=1,
           decimals=0, th=ANY_IS_BAD),
    ]
    return dashboard("shopfloor-health", "Shopfloor / Health and remediation",
                     "Risk scores, health states, cordoned chips and recent remediation decisions.",
                     p, variables("cluster", "vendor", "node", "chip"))


DASHBOARDS = {
    "fleet-overview": fleet_overview, "node-detail": node_detail, "chip-detail": chip_detail,
    "power-thermals": power_thermals, "efa-network": efa_network, "trainium": trainium,
    "capacity-trends": capacity, "health": health,
}


def build() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{name}.json": json.dumps(fn(), indent=2, sort_keys=True) + "\n" for name, fn in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when dashboards/json is stale")
    args = ap.parse_args(argv)
    built = build()
    if args.check:
        stale = [n for n, text in built.items()
                 if not (OUT / n).exists() or (OUT / n).read_text(encoding="utf-8") != text]
        extra = sorted(p.name for p in OUT.glob("*.json") if p.name not in built)
        for n in stale + extra:
            print(f"stale: dashboards/json/{n} (run dashboards/build.py)", file=sys.stderr)
        return 1 if stale or extra else 0
    OUT.mkdir(exist_ok=True)
    for p in OUT.glob("*.json"):
        if p.name not in built:
            p.unlink()
    for n, text in built.items():
        (OUT / n).write_text(text, encoding="utf-8")
        print(f"wrote dashboards/json/{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
