"""Waiting for a run's data: a deferrable operator and its trigger (Airflow's own deferral mechanism).

The operator looks once; when a day of the window is still missing it defers to `WindowFilesTrigger`, which polls
in the triggerer (no worker slot held) until every day has a data file or `wait_timeout_minutes` pass. Then the
task resumes on a worker: it succeeds, or fails naming the missing day(s), and the run stops before ingest.
This is the one module that imports Airflow; what it checks lives in `lepton_tasks.data.windows`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from lepton_tasks.config.specs import LoadedSpec
from lepton_tasks.data.windows import DaySource
from lepton_tasks.orchestration import pipeline

GRACE_MINUTES = 10


class WindowFilesTrigger(BaseTrigger):
    """Fires when every URI (absolute, one per day) holds a data file, or every day has rows in a SQL source, or
    at `deadline` (epoch seconds) with the days still missing."""

    def __init__(self, sources: list[dict], fmt: str | None, poke_seconds: float, deadline: float,
                 sql: dict | None = None):
        super().__init__()
        self.sources, self.fmt, self.poke_seconds, self.deadline = sources, fmt, poke_seconds, deadline
        self.sql = sql  # a SqlSource's fields (its connection is looked up by id: no login in the trigger's row)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"sources": self.sources, "fmt": self.fmt, "poke_seconds": self.poke_seconds,
                 "deadline": self.deadline, "sql": self.sql})

    def _missing(self, days: list[DaySource]) -> list[DaySource]:
        from lepton_tasks.data import warehouse
        from lepton_tasks.data.sources import missing

        if self.sql is not None:
            return warehouse.missing_days(warehouse.SqlSource(**self.sql), days)
        return missing(days, Path("/"), self.fmt)  # the URIs are absolute already

    async def run(self):
        days = [DaySource(**s) for s in self.sources]
        while True:
            # listing a store or querying a database is blocking I/O: off the triggerer's event loop
            absent = await asyncio.to_thread(self._missing, days)
            if not absent or time.time() >= self.deadline:
                yield TriggerEvent({"missing": [s.to_dict() for s in absent]})
                return
            self.log.info("waiting for %d day(s): %s", len(absent), ", ".join(s.day or s.uri for s in absent))
            await asyncio.sleep(min(self.poke_seconds, max(self.deadline - time.time(), 0.1)))


class WaitForWindow(BaseOperator):
    """Wait (deferred) for every day of the run's window; fail naming the missing day(s) after the timeout."""

    ui_color = "#e8f0fe"

    def __init__(self, loaded: LoadedSpec, **kwargs):
        super().__init__(**kwargs)
        self.loaded = loaded

    def execute(self, context):
        ctx = pipeline.from_airflow(context, self.loaded)
        absent = pipeline.missing_days(ctx)
        if not absent or ctx.params.wait_timeout_minutes == 0:
            return pipeline.wait(ctx, absent).to_dict()
        minutes, sql = ctx.params.wait_timeout_minutes, pipeline.sql_source(ctx)
        self.defer(trigger=WindowFilesTrigger([s.to_dict() for s in pipeline.absolute(ctx, absent)],
                                              ctx.spec.source.format, ctx.params.wait_poke_seconds,
                                              time.time() + minutes * 60, asdict(sql) if sql else None),
                   method_name="execute_complete",
                   # the trigger ends the wait itself, naming the days; this only bounds a triggerer that is gone
                   timeout=timedelta(minutes=minutes + GRACE_MINUTES))

    def execute_complete(self, context, event: dict):
        ctx = pipeline.from_airflow(context, self.loaded)
        return pipeline.wait(ctx, [DaySource(**s) for s in event["missing"]]).to_dict()
