"""SQL sources on a real PostgreSQL (and SQLite through the generic path): a table of 280,000 sensor readings over
14 days, each night's window read in key order, a query's placeholders bound by the driver, and each bad input
failing with the connection named (never its password) and nothing written."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from lepton_tasks.config.settings import PIPELINES_DIR, Settings
from lepton_tasks.config.specs import load_spec
from lepton_tasks.core.errors import BadParam, BadSource, WarehouseAccessDenied, WarehouseUnavailable
from lepton_tasks.core.storage import read_json
from lepton_tasks.data import warehouse
from lepton_tasks.data.warehouse import SqlSource
from lepton_tasks.data.windows import DaySource
from lepton_tasks.orchestration import pipeline
from lepton_tasks.orchestration.wait import WindowFilesTrigger
from lepton_tasks.stages.ingest import ingest_sql
from lepton_tasks.stages.validate import validate
from lepton_tasks.tools.airflow_env import scratch_database
from lepton_tasks.tools.demo_data import SENSOR_TABLE, load_sensor_days, sensor_days
from lepton_tasks.tools.services import postgres_connection
from tests.conftest import postgres_server_url

DAYS = sensor_days("2026-11-01", "2026-11-14")
ROWS_A_DAY = 20_000
SECRET = "never-in-a-message-7f3a"
EXPECTED = {"temperature_c": "numeric", "line": "any", "fault": "any"}


@pytest.fixture(scope="module")
def postgres_db():
    """A throwaway database holding the sensor table: 14 days of 20,000 readings."""
    with scratch_database(postgres_server_url("the SQL source tests"), "lepton_wh") as url:
        engine = sa.create_engine(url)
        load_sensor_days(engine, DAYS, ROWS_A_DAY)
        engine.dispose()
        yield url


def _connection(url: sa.URL, **changes) -> str:
    return postgres_connection(url, password=SECRET, **changes)  # trust auth here: the password is unused


@pytest.fixture
def warehouse_conn(postgres_db, monkeypatch) -> str:
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", _connection(postgres_db))
    return "warehouse"


def _count(url: sa.URL, where: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        count = conn.execute(sa.text(f"SELECT count(*) FROM {SENSOR_TABLE} WHERE {where}")).scalar()
    engine.dispose()
    return count


def test_a_night_reads_its_window_in_key_order_and_a_retry_reads_the_same_rows(warehouse_conn, postgres_db,
                                                                                 tmp_path):
    source = SqlSource(warehouse_conn, table=SENSOR_TABLE, partition_column="day")
    first = ingest_sql(source, tmp_path / "a" / "ingest", EXPECTED, dt.date(2026, 11, 10), 3)
    assert first.rows == _count(postgres_db, "day BETWEEN '2026-11-08' AND '2026-11-10'") == 3 * ROWS_A_DAY
    table = pq.read_table(first.parts)
    days = table.column("day").to_pylist()
    assert {d.isoformat() for d in days} == {"2026-11-08", "2026-11-09", "2026-11-10"}
    assert days == sorted(days)  # ordered by every column, the day first
    assert str(table.schema.field("temperature_c").type) == "double" and first.columns["fault"] == "int64"
    read = first.window[0]
    assert read["values"] == {"window_start": "2026-11-08", "next_ds": "2026-11-11"}
    assert "2026-11" not in read["statement"] and ":window_start" in read["statement"]  # bound, not pasted
    retried = ingest_sql(source, tmp_path / "b" / "ingest", EXPECTED, dt.date(2026, 11, 10), 3)
    assert (retried.sha256, retried.source_sha256) == (first.sha256, first.source_sha256)  # resumption's key holds
    assert first.source_uri == "sql://warehouse/sensor_readings" and SECRET not in json.dumps(first.to_dict())


def test_a_query_binds_its_placeholders_and_keeps_its_literals(warehouse_conn, tmp_path):
    query = ("SELECT day::text AS day_text, line, fault, '10:30' AS shift, temperature_c FROM sensor_readings "
             "WHERE day = '{ds}' AND line LIKE 'C%' ORDER BY temperature_c, vibration_mm_s")
    source = SqlSource(warehouse_conn, query=query)
    ingested = ingest_sql(source, tmp_path / "ingest", EXPECTED, dt.date(2026, 11, 12), 1)
    table = pq.read_table(ingested.parts)
    assert set(table.column("day_text").to_pylist()) == {"2026-11-12"} and set(table.column("line").to_pylist()) \
        == {"C"}
    assert set(table.column("shift").to_pylist()) == {"10:30"}
    assert ingested.window[0]["values"] == {"ds": "2026-11-12"} and "'{ds}'" not in ingested.window[0]["statement"]


def test_postgresql_types_nulls_and_empty_text_arrive_as_they_are(postgres_db, warehouse_conn, tmp_path):
    engine = sa.create_engine(postgres_db)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE typed (id int PRIMARY KEY, note text, ok boolean, amount numeric(8,2), "
                             "at timestamptz, day date)"))
        conn.execute(sa.text("INSERT INTO typed VALUES (1, NULL, true, 1.50, '2026-11-02 10:00+01', '2026-11-02'),"
                             " (2, '', false, NULL, NULL, '2026-11-02'), (3, 'NA', NULL, -2, NULL, '2026-11-02'), "
                             "(4, 'a,\"b\"\nc', true, 0, NULL, '2026-11-02')"))
    engine.dispose()
    ingested = ingest_sql(SqlSource(warehouse_conn, table="typed"), tmp_path / "ingest", {}, dt.date(2026, 11, 2), 1)
    rows = pq.read_table(ingested.parts).to_pylist()
    assert [r["note"] for r in rows] == [None, "", "NA", 'a,"b"\nc']
    assert [r["ok"] for r in rows] == [True, False, None, True] and [r["amount"] for r in rows] == [1.5, None, -2, 0]
    assert rows[0]["at"] == dt.datetime(2026, 11, 2, 9, tzinfo=dt.UTC)


def test_sqlite_through_the_generic_path_reads_what_postgresql_reads(warehouse_conn, tmp_path, monkeypatch):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    load_sensor_days(engine, DAYS[8:10], ROWS_A_DAY)
    engine.dispose()
    monkeypatch.setenv("AIRFLOW_CONN_LITE", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "warehouse.db")}))
    night = dt.date(2026, 11, 10)
    lite = ingest_sql(SqlSource("lite", table=SENSOR_TABLE, partition_column="day"), tmp_path / "lite", EXPECTED,
                      night, 2)
    postgres = ingest_sql(SqlSource(warehouse_conn, table=SENSOR_TABLE, partition_column="day"), tmp_path / "pg",
                          EXPECTED, night, 2)
    columns = ["machine_type", "line", "temperature_c", "vibration_mm_s", "pressure_bar", "load_pct", "fault"]
    ordered = [(c, "ascending") for c in columns]
    assert pq.read_table(lite.parts, columns=columns).sort_by(ordered).equals(
        pq.read_table(postgres.parts, columns=columns).sort_by(ordered))
    assert lite.rows == postgres.rows == 2 * ROWS_A_DAY


def _failure(source: SqlSource, stage_dir, ds=dt.date(2026, 11, 10)) -> str:
    with pytest.raises(Exception) as raised:
        ingest_sql(source, stage_dir, EXPECTED, ds, 1)
    assert not stage_dir.exists() and not list(stage_dir.parent.glob(".*"))  # nothing half-written
    assert SECRET not in str(raised.value)
    return raised


@pytest.mark.parametrize(("source", "error", "names"), [
    (SqlSource("warehouse", table="no_such_table", partition_column="day"), BadSource,
     "table 'no_such_table' does not exist (through connection 'warehouse'"),
    (SqlSource("warehouse", table=SENSOR_TABLE, partition_column="dt"), BadSource,
     "table 'sensor_readings' has no column 'dt' (the source's partition_column"),
    (SqlSource("warehouse", query="SELECT * FROM sensor_readings WHERE dy = '{ds}'"), BadSource,
     "connection 'warehouse' (postgres://"),
    (SqlSource("warehouse", table=SENSOR_TABLE, partition_column="day"), BadSource,
     "sql://warehouse/sensor_readings (connection 'warehouse') returned no rows for the window 2026-12-25"),
    (SqlSource("undefined_conn", table=SENSOR_TABLE), BadSource,
     "Airflow connection 'undefined_conn' (the source's conn_id) is not defined"),
], ids=["missing table", "missing column", "query error", "empty partition", "undefined connection"])
def test_each_bad_source_fails_naming_it_and_writes_nothing(warehouse_conn, tmp_path, source, error, names):
    ds = dt.date(2026, 12, 25) if "no rows" in names else dt.date(2026, 11, 10)
    raised = _failure(source, tmp_path / "run" / "ingest", ds)
    assert type(raised.value) is error and names in str(raised.value)
    if "query error" in names or "dy" in (source.query or ""):
        assert 'column "dy" does not exist' in str(raised.value)


def test_a_refused_login_and_a_server_that_is_down_name_the_connection(postgres_db, tmp_path, monkeypatch):
    source = SqlSource("warehouse", table=SENSOR_TABLE, partition_column="day")
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", _connection(postgres_db, login="no_such_role"))
    refused = _failure(source, tmp_path / "a" / "ingest").value
    assert isinstance(refused, WarehouseAccessDenied) and not refused.retryable
    assert "check the login and password of Airflow connection 'warehouse'" in str(refused)
    assert 'role "no_such_role" does not exist' in str(refused)
    import socket

    with socket.socket() as closed:  # a port nothing listens on: the server is down
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", _connection(postgres_db, port=port))
    down = _failure(source, tmp_path / "b" / "ingest").value
    assert isinstance(down, WarehouseUnavailable) and down.retryable
    assert f"connection 'warehouse' (postgres://postgres@127.0.0.1:{port}/" in str(down)


def test_waiting_looks_for_each_day_s_rows_and_the_trigger_fires_when_they_land(postgres_db, warehouse_conn):
    source = SqlSource(warehouse_conn, table=SENSOR_TABLE, partition_column="day")
    days = warehouse.window_days(source, dt.date(2026, 11, 15), 3)
    assert [d.day for d in warehouse.missing_days(source, days)] == ["2026-11-15"]
    query = SqlSource(warehouse_conn, query="SELECT * FROM sensor_readings WHERE day >= '{window_start}' "
                      "AND day < '{next_ds}'")
    assert warehouse.missing_days(query, warehouse.window_days(query, dt.date(2026, 11, 14), 2)) == []
    late = warehouse.window_days(query, dt.date(2026, 11, 16), 2)
    assert warehouse.missing_days(query, late) == late

    async def wait_for_the_day() -> dict:
        trigger = WindowFilesTrigger([DaySource("2026-11-15", source.uri).to_dict()], None, 0.2, time.time() + 60,
                                     {"conn_id": warehouse_conn, "table": SENSOR_TABLE, "partition_column": "day"})
        events = trigger.run()
        landing = asyncio.get_running_loop().run_in_executor(None, _land_day, postgres_db, "2026-11-15")
        event = await anext(events)
        await landing
        return event.payload

    assert asyncio.run(wait_for_the_day()) == {"missing": []}


def _land_day(url: sa.URL, day: str) -> None:
    time.sleep(1)  # after the trigger's first look
    engine = sa.create_engine(url)
    load_sensor_days(engine, [day], 100)
    engine.dispose()


def test_the_bundled_warehouse_pipeline_ingests_its_window_and_the_form_names_no_other_sql_source(
        postgres_db, data_root, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_LEPTON_WAREHOUSE", _connection(postgres_db))
    loaded = load_spec(PIPELINES_DIR / "lepton_sensors_warehouse.yaml")
    defaults = loaded.spec.run_defaults()
    ctx = pipeline.RunContext(loaded, loaded.name, "manual__1", defaults, Settings.from_env(), dt.date(2026, 11, 10))
    assert pipeline.sql_source(ctx) == loaded.spec.source.sql and pipeline.missing_days(ctx) == []
    ingested = pipeline.ingest(ctx)
    assert ingested.rows == 2 * ROWS_A_DAY and read_json(ctx.summary_path("ingest"))["status"] == "success"
    other = replace(ctx, params=defaults.model_copy(update={"source_uri": "sql://other/secrets"}))
    with pytest.raises(BadParam, match="param 'source_uri' \\('sql://other/secrets'\\) names a SQL source"):
        pipeline.sql_source(other)
    exported = replace(ctx, params=defaults.model_copy(update={"source_uri": "landing/export.parquet"}))
    assert pipeline.sql_source(exported) is None  # a file given for this run is read instead


def test_new_pipeline_profiles_a_table_in_the_database_and_each_night_passes_its_suite(postgres_db, tmp_path,
                                                                                       monkeypatch):
    env = {**os.environ, "AIRFLOW_CONN_WAREHOUSE": _connection(postgres_db),
           "LEPTON_PIPELINES_DIR": str(tmp_path / "pipelines"), "LEPTON_EXPECTATIONS_DIR": str(tmp_path / "suites")}
    made = subprocess.run([str(Path(sys.executable).parent / "lepton"), "new-pipeline", "readings", "--source",
                           f"conn_id:warehouse/table:{SENSOR_TABLE}/partition_column:day", "--target", "fault",
                           "--window-days", "2"], capture_output=True, text=True, env=env, timeout=180)
    assert made.returncode == 0, made.stderr
    rows = _count(postgres_db, "true")  # 14 days, and the day another test landed
    assert f"profiled all {rows} rows in the database (sql://warehouse/sensor_readings)" in made.stdout
    assert SECRET not in made.stdout + made.stderr
    monkeypatch.setenv("LEPTON_EXPECTATIONS_DIR", str(tmp_path / "suites"))
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", _connection(postgres_db))
    spec = load_spec(tmp_path / "pipelines" / "readings.yaml").spec
    assert spec.source.sql == SqlSource("warehouse", SENSOR_TABLE, partition_column="day")
    assert "day" not in spec.features and spec.target.classes == [0, 1] and spec.source.window_days == 2
    for night in ("2026-11-02", "2026-11-13"):  # before and after line C's pressure shift
        staged = ingest_sql(spec.source.sql, tmp_path / night / "ingest", {}, dt.date.fromisoformat(night), 2)
        assert validate(staged.parts, spec.suite_file, tmp_path / night / "validate").failed == 0


def test_a_connection_dropped_mid_extract_is_retryable_and_leaves_nothing(postgres_db, warehouse_conn, tmp_path,
                                                                          monkeypatch):
    """The server ends the session (pg_terminate_backend, as a failover or an admin would) while COPY streams."""
    import lepton_tasks.stages.ingest as ingest_stage

    killed = []
    admin = sa.create_engine(postgres_db, isolation_level="AUTOCOMMIT")
    extract = warehouse.extract

    def extract_and_drop(source, ds, window_days, write_batch, reader=None):
        def write(batch):
            if not killed:  # after the first batch landed: the session is mid-COPY
                with admin.connect() as conn:
                    killed.extend(conn.execute(sa.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE "
                        "'COPY (SELECT%' AND pid <> pg_backend_pid()")).scalars())
                    assert len(killed) == 1, killed  # the extract's own session, and only it
                    assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": killed[0]}).scalar()
            write_batch(batch)
        return extract(source, ds, window_days, write, reader)

    monkeypatch.setattr(ingest_stage, "extract", extract_and_drop)
    monkeypatch.setattr(warehouse, "CSV_BLOCK_BYTES", 1 << 16)  # many batches, so the drop lands mid-stream
    source = SqlSource(warehouse_conn, table=SENSOR_TABLE, partition_column="day")
    dropped = _failure(source, tmp_path / "run" / "ingest", dt.date(2026, 11, 14)).value
    admin.dispose()
    assert killed and isinstance(dropped, WarehouseUnavailable) and dropped.retryable
    assert "connection 'warehouse'" in str(dropped)
