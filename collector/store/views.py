"""The stable SQL views users query (docs/sql.md documents them; the tables under them may change).

    metrics                     ts TIMESTAMP, name, labels MAP(VARCHAR, VARCHAR), value  (raw samples)
    rollup_5m, rollup_1h        ts (bucket start), name, labels, min, max, avg, sum, count, last
    accelerator_inventory       cluster, vendor, model, chips                 (chips ever seen)
    accelerator_hours_daily     day, cluster, vendor, model, chips, chip_hours, busy_chip_hours, utilization
    power_per_rack_hourly       hour, cluster, rack, chips, accelerator_watts, accelerator_peak_watts,
                                host_watts, energy_kwh
    memory_headroom_daily       day, vendor, model, chips, memory_bytes, peak_used_bytes,
                                avg_used_fraction, peak_used_fraction, min_headroom_bytes

Capacity views read rollup_1h (kept much longer than raw samples), so they cover the whole
rollup retention and cost little. Metric names are taken from the catalog, never spelled here.
"""

from __future__ import annotations

from agent.catalog import catalog


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def view_sql() -> list[str]:
    cat = catalog()
    util = _q(cat.prom("hw.gpu.utilization"))
    power = _q(cat.prom("hw.power"))
    host_power = _q(cat.prom("hw.host.power"))
    mem_used = _q(cat.prom("hw.gpu.memory.usage"))
    mem_limit = _q(cat.prom("hw.gpu.memory.limit"))
    info = _q(cat.prom("hw.gpu.info"))
    out = [
        """CREATE OR REPLACE VIEW metrics AS
           SELECT make_timestamp(s.ts * 1000) AS ts, se.metric AS name, se.labels AS labels, s.value AS value
           FROM samples s JOIN series se ON se.id = s.series_id""",
    ]
    for res in ("5m", "1h"):
        out.append(f"""CREATE OR REPLACE VIEW rollup_{res} AS
           SELECT make_timestamp(r.bucket * 1000) AS ts, se.metric AS name, se.labels AS labels,
                  r.min, r.max, r.sum / nullif(r.count, 0) AS avg, r.sum, r.count, r.last
           FROM rollup_{res}_data r JOIN series se ON se.id = r.series_id""")
    out += [
        f"""CREATE OR REPLACE VIEW accelerator_inventory AS
           SELECT labels['cluster'] AS cluster, labels['vendor'] AS vendor, labels['model'] AS model,
                  count(DISTINCT labels['uuid']) AS chips
           FROM series WHERE metric = {info}
           GROUP BY ALL""",
        f"""CREATE OR REPLACE VIEW accelerator_hours_daily AS
           SELECT CAST(date_trunc('day', ts) AS DATE) AS day, labels['cluster'] AS cluster,
                  labels['vendor'] AS vendor, labels['model'] AS model,
                  count(DISTINCT labels['uuid']) AS chips,
                  count(*) AS chip_hours,                       -- chip-hours with telemetry
                  sum(avg) AS busy_chip_hours,                  -- chip-hours weighted by utilization
                  sum(avg) / count(*) AS utilization
           FROM rollup_1h WHERE name = {util}
           GROUP BY ALL""",
        f"""CREATE OR REPLACE VIEW power_per_rack_hourly AS
           SELECT ts AS hour, labels['cluster'] AS cluster, labels['rack'] AS rack,
                  count(DISTINCT labels['uuid']) FILTER (WHERE name = {power}) AS chips,
                  sum(avg) FILTER (WHERE name = {power}) AS accelerator_watts,         -- NULL: no chip reports it
                  sum(max) FILTER (WHERE name = {power}) AS accelerator_peak_watts,
                  coalesce(sum(avg) FILTER (WHERE name = {host_power}
                                            AND labels['sensor'] = 'dcmi_instantaneous'), 0) AS host_watts,
                  sum(avg) FILTER (WHERE name = {power}) / 1000.0 AS energy_kwh
           FROM rollup_1h WHERE name IN ({power}, {host_power})
           GROUP BY ALL""",
        f"""CREATE OR REPLACE VIEW memory_headroom_daily AS
           WITH used AS (SELECT ts, labels['uuid'] AS uuid, labels['vendor'] AS vendor,
                                labels['model'] AS model, avg, max FROM rollup_1h WHERE name = {mem_used}),
                lim AS (SELECT ts, labels['uuid'] AS uuid, last AS limit_bytes FROM rollup_1h WHERE name = {mem_limit})
           SELECT CAST(date_trunc('day', used.ts) AS DATE) AS day, vendor, model,
                  count(DISTINCT used.uuid) AS chips,
                  max(limit_bytes) AS memory_bytes,
                  max(used.max) AS peak_used_bytes,
                  avg(used.avg / nullif(limit_bytes, 0)) AS avg_used_fraction,
                  max(used.max / nullif(limit_bytes, 0)) AS peak_used_fraction,
                  min(limit_bytes - used.max) AS min_headroom_bytes
           FROM used JOIN lim USING (ts, uuid)
           GROUP BY ALL""",
    ]
    return out


VIEWS = ("metrics", "rollup_5m", "rollup_1h", "accelerator_inventory", "accelerator_hours_daily",
         "power_per_rack_hourly", "memory_headroom_daily")


def create_views(con) -> None:
    for stmt in view_sql():
        con.execute(stmt)
