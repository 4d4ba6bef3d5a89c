"""Scheduled storage upkeep: one apscheduler job that keeps the store tidy.

Each run: forget old batch keys (see writer). Rollups, compaction, retention and Parquet
export are added by collector.store.rollup / compact / export.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def run_once(ctx) -> dict:
    """One maintenance pass; returns what it did (for logs and tests)."""
    done = {"batch_keys_forgotten": ctx.writer.forget_batch_keys()}
    return done


def schedule(ctx) -> None:
    def job() -> None:
        try:
            log.info("maintenance: %s", run_once(ctx))
        except Exception:  # noqa: BLE001 - a failed pass is logged and retried next interval
            log.exception("maintenance pass failed")

    ctx.scheduler.add_job(job, "interval", seconds=ctx.config.storage.maintenance_interval_s,
                          id="storage-maintenance", max_instances=1, coalesce=True)
