"""`sql_ingest`: the ingest stage on a PostgreSQL table (1 M sensor readings over 30 days, an `id` primary key),
reading one 30-day window into the run's Parquet stage, against the script a competent engineer writes by hand:
`COPY (SELECT ... WHERE day ...) TO STDOUT (FORMAT csv, HEADER)` through psycopg into `pyarrow.csv.read_csv`,
then `pyarrow.parquet.write_table` (the whole extract in memory, no order, no checks). Value and baseline are
interleaved (bench.common); goal: at least 0.8x the baseline's rows/s.

Beside it, what the choice of COPY rests on (`sql_ingest.json`): the stage's extraction into Parquet through COPY
against the same through a server-side cursor (SQLAlchemy `stream_results`, the generic path other databases
take), interleaved too.

PostgreSQL: LEPTON_BENCH_POSTGRES_URL, else LEPTON_TEST_POSTGRES_URL, else the local default.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
from contextlib import contextmanager
from pathlib import Path

from bench.common import interleaved, record, timed

DAYS = 30
ROWS_A_DAY = 33_334
NIGHT = dt.date(2026, 11, 30)
GOAL = 0.8


@contextmanager
def postgres_table(rows_a_day: int = ROWS_A_DAY):
    """A throwaway database with the sensor table (an `id` primary key added), its connection as AIRFLOW_CONN_BENCH."""
    import sqlalchemy as sa

    from lepton_tasks.tools.airflow_env import scratch_database
    from lepton_tasks.tools.demo_data import load_sensor_days, sensor_days
    from lepton_tasks.tools.services import DEFAULT_POSTGRES, postgres_connection

    server = os.environ.get("LEPTON_BENCH_POSTGRES_URL") or os.environ.get("LEPTON_TEST_POSTGRES_URL") \
        or DEFAULT_POSTGRES
    with scratch_database(server, "lepton_bench") as url:
        engine = sa.create_engine(url)
        try:
            load_sensor_days(engine, sensor_days("2026-11-01", NIGHT.isoformat()), rows_a_day)
            with engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE sensor_readings ADD COLUMN id bigserial PRIMARY KEY"))
                conn.execute(sa.text("ANALYZE sensor_readings"))
        finally:
            engine.dispose()
        os.environ["AIRFLOW_CONN_BENCH"] = postgres_connection(url)
        yield url


def hand_written(url, target: Path) -> int:
    """The baseline: COPY to CSV in memory, pyarrow reads it, pyarrow writes Parquet."""
    import io

    import psycopg
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    start = (NIGHT - dt.timedelta(days=DAYS - 1)).isoformat()
    buffer = io.BytesIO()
    with psycopg.connect(host=url.host, port=url.port or 5432, user=url.username, dbname=url.database) as conn:
        with conn.cursor().copy("COPY (SELECT * FROM sensor_readings WHERE day >= %s AND day < %s) TO STDOUT "
                                "(FORMAT csv, HEADER)", (start, (NIGHT + dt.timedelta(days=1)).isoformat())) as copy:
            for chunk in copy:
                buffer.write(chunk)
    buffer.seek(0)
    table = pacsv.read_csv(buffer)
    pq.write_table(table, target)
    return table.num_rows


def stage(target: Path) -> int:
    """The ingest stage (through COPY)."""
    from lepton_tasks.data.warehouse import SqlSource
    from lepton_tasks.stages.ingest import ingest_sql

    return ingest_sql(SqlSource("bench", table="sensor_readings", partition_column="day"), target, {}, NIGHT,
                      DAYS).rows


def extract_to_parquet(target: Path, through_cursor: bool) -> int:
    """The stage's extraction alone, through COPY or through the generic server-side cursor, into Parquet."""
    import pyarrow.parquet as pq

    from lepton_tasks.data import warehouse

    writers = []

    def write(batch):
        writers or writers.append(pq.ParquetWriter(target, batch.schema))
        writers[0].write_batch(batch)

    source = warehouse.SqlSource("bench", table="sensor_readings", partition_column="day")
    _, read = warehouse.extract(source, NIGHT, DAYS, write, warehouse._cursor_batches if through_cursor else None)
    writers[0].close()
    return read.rows


def sql_ingest_bench(work: Path) -> tuple[dict, dict]:
    rows = DAYS * ROWS_A_DAY
    runs = iter(range(10_000))
    with postgres_table() as url:
        stage(work / "warm-up")  # imports and the first connection, on neither side of the ratio
        hand_written(url, work / "warm-up.parquet")
        measured = interleaved(lambda: rows / timed(stage, work / f"stage-{next(runs)}")[1],
                               lambda: rows / timed(hand_written, url, work / f"script-{next(runs)}.parquet")[1],
                               label="sql_ingest")
        paths = interleaved(lambda: rows / timed(extract_to_parquet, work / f"copy-{next(runs)}.parquet", False)[1],
                            lambda: rows / timed(extract_to_parquet, work / f"cursor-{next(runs)}.parquet", True)[1],
                            label="COPY against a server-side cursor")
    summary = record(measured, f"ingest of a {DAYS}-day window ({rows:,} rows) from PostgreSQL >= {GOAL}x a "
                     "hand-written COPY/pyarrow script", "rows/s", True, lambda r: r >= GOAL, rows=rows,
                     copy_over_cursor=statistics.median(paths.ratios))
    detail = {"rows": rows, "stage_rows_per_s": measured.values, "script_rows_per_s": measured.baselines,
              "ratios": measured.ratios, "copy_rows_per_s": paths.values, "cursor_rows_per_s": paths.baselines,
              "copy_over_cursor": paths.ratios}
    return summary, detail


def gx_in_database(url, suite: dict) -> bool:
    """GX 1.x's SQL engine validating the suite in PostgreSQL, on a query asset of the same window."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    start, after = (NIGHT - dt.timedelta(days=DAYS - 1)).isoformat(), (NIGHT + dt.timedelta(days=1)).isoformat()
    asset = context.data_sources.add_postgres("warehouse", connection_string=url.render_as_string(False)) \
        .add_query_asset("window", query=f"SELECT * FROM sensor_readings WHERE day >= '{start}' AND day < '{after}'")
    batch = asset.add_batch_definition_whole_table("all").get_batch()
    suite_copy = json.loads(json.dumps(suite))
    return bool(batch.validate(context.suites.add(gx.ExpectationSuite(name=suite_copy["name"],
                                                                      expectations=suite_copy["expectations"]))).success)


def validate_in_database_bench(work: Path) -> tuple[dict, dict]:
    """The validate stage on the extract (the stage as a run calls it: suite, result, data docs) against GX's SQL
    engine validating the same suite in the database on the same window."""
    from lepton_tasks.stages.validate import load_suite, validate
    from lepton_tasks.tools.new_pipeline import new_pipeline

    rows = DAYS * ROWS_A_DAY
    runs = iter(range(10_000))
    with postgres_table() as url:
        os.environ["LEPTON_EXPECTATIONS_DIR"] = str(work / "suites")  # the suite `lepton new-pipeline` makes of it
        made = new_pipeline("bench_readings", "conn_id:bench/table:sensor_readings/partition_column:day", "fault",
                            work, work / "pipelines", work / "suites")
        suite_file = made.suite_path
        suite = load_suite(suite_file)
        extract = work / "extract"
        stage(extract)
        parts = [str(p) for p in sorted(extract.glob("part-*.parquet"))]
        assert validate(parts, suite_file, work / "warm-up-validate").failed == 0 and gx_in_database(url, suite)
        measured = interleaved(lambda: rows / timed(validate, parts, suite_file, work / f"validate-{next(runs)}")[1],
                               lambda: rows / timed(gx_in_database, url, suite)[1], label="validate_in_database")
    summary = record(measured, "the validate stage on the extract at least as fast as GX's SQL engine validating the "
                     "same suite in PostgreSQL (else validating in the database would be the better choice)",
                     "rows/s", True, lambda r: r >= 1.0, rows=rows)
    return summary, {"rows": rows, "stage_rows_per_s": measured.values, "gx_sql_rows_per_s": measured.baselines,
                     "ratios": measured.ratios}
