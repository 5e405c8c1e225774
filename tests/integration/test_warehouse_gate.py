"""A warehouse table as a nightly source and a person at the promotion gate, under Airflow's real scheduler,
triggerer and api-server, with PostgreSQL as the warehouse (the bundled `lepton_sensors_warehouse`, smaller):

- `lepton backfill` of three nights from a plain shell, each night reading its day's rows from the table; the
  third night's rows land while its `wait` is deferred in the triggerer (which polls the table); every candidate
  waits for a person in its own run of `lepton_sensors_warehouse_approval`, and the backfill finishes without
  waiting for any decision;
- Chromium logs in, opens Required Actions, reads the evidence of the newest night and approves it: `champion`
  moves, the champion Asset is published, MLflow and the night's report say who approved and when;
- over the REST API, the oldest night is approved too late (superseded: `champion` moved since it was compared)
  and the middle one rejected: `champion` stays;
- a pipeline whose gate times out (seconds here) rejects by default, nothing promoted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.core.storage import RunPaths
from lepton_tasks.tools.airflow_env import BIN, RUN_TIMEOUT_S, AirflowEnv, read_report, wait_for
from lepton_tasks.tools.demo_data import load_sensor_days
from tests.conftest import postgres_server_url

pytestmark = pytest.mark.slow

DAG, GATE = "lepton_sensors_warehouse", "lepton_sensors_warehouse_approval"
HURRIED, HURRIED_GATE = "wh_hurried", "wh_hurried_approval"  # the same pipeline, its gate timing out in 18 s
MODEL = "lepton-sensors-warehouse"
NIGHTS = ("2026-11-10", "2026-11-11", "2026-11-12")
SMALL = {"num_shards": 2, "local_epochs": 1, "hidden_size": 16}
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LEPTON_TEST_ARTIFACTS", REPO_ROOT / "var" / "test-artifacts")) / "approval"


def _specs(folder: Path) -> Path:
    spec = yaml.safe_load((REPO_ROOT / "dags" / "pipelines" / f"{DAG}.yaml").read_text())
    spec["training"].update(SMALL)
    spec["merge"]["merge_rounds"] = 1
    spec["source"].update(window_days=1, wait={"timeout_minutes": 10, "poke_seconds": 2})
    folder.mkdir()
    (folder / f"{DAG}.yaml").write_text(yaml.safe_dump(spec))
    hurried = {**spec, "name": HURRIED, "schedule": None, "promotion": {"approval": "required", "timeout_hours": 0.005},
               "mlflow": {"experiment": HURRIED, "registered_model": "wh-hurried"}}
    (folder / f"{HURRIED}.yaml").write_text(yaml.safe_dump(hurried))
    return folder


@pytest.fixture(scope="module")
def warehouse_url():
    server = sa.make_url(postgres_server_url("the warehouse gate test"))
    name = f"lepton_gate_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = server.set(drivername="postgresql+psycopg", database=name)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _land(url: sa.URL, days: list[str]) -> None:
    engine = sa.create_engine(url)
    load_sensor_days(engine, days, 800)
    engine.dispose()


@pytest.fixture(scope="module")
def gate(tmp_path_factory, warehouse_url):
    tmp = tmp_path_factory.mktemp("gate")
    env = AirflowEnv.sqlite(tmp)
    _land(warehouse_url, list(NIGHTS[:2]))  # the third night lands while its run waits
    env.migrate()
    connection = {"conn_type": "postgres", "host": warehouse_url.host, "port": warehouse_url.port or 5432,
                  "login": warehouse_url.username, "schema": warehouse_url.database}
    extra = {"LEPTON_PIPELINES_DIR": str(_specs(tmp / "pipelines")),
             "AIRFLOW_CONN_LEPTON_WAREHOUSE": json.dumps(connection)}
    with env.serving(DAG, **extra) as served:
        both = {**extra, **served}
        env.wait_serialized(HURRIED)
        env.unpause(both, HURRIED)
        env.trigger(both, "hurried", {}, f"{NIGHTS[0]}T04:00:00+00:00", HURRIED)  # beside the backfill
        yield env, both, warehouse_url


def _registry(env: AirflowEnv):
    from mlflow import MlflowClient

    return MlflowClient(env.mlflow_uri)


def _gate_runs(env: AirflowEnv, extra: dict, dag_id: str = GATE) -> dict[str, dict]:
    """The approval runs by night, each with its `approve` task's state."""
    runs = env.api(extra, f"/api/v2/dags/{dag_id}/dagRuns")["dag_runs"]
    return {run["conf"]["ds"]: {**run, "approve": env.task_state(run["dag_run_id"], "approve", dag_id)}
            for run in runs}


def test_a_backfill_from_the_warehouse_asks_a_person_for_each_night(gate):
    env, extra, url = gate
    backfill = subprocess.Popen([str(BIN / "lepton"), "backfill", DAG, "--from", NIGHTS[0], "--to", NIGHTS[-1]],
                                env=env.env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd="/")
    third = f"backfill__{NIGHTS[-1]}T03:15:00+00:00"
    wait_for(lambda: env.task_state(third, "wait", DAG) == "deferred", RUN_TIMEOUT_S * 2,
             "the third night to wait, deferred, for its rows", describe=lambda: env.task_states(third, DAG))
    _land(url, [NIGHTS[-1]])  # the triggerer's next look finds them
    out, err = backfill.communicate(timeout=RUN_TIMEOUT_S * 3)
    assert backfill.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}\n{env.component_logs()}"
    reports = [read_report(Path(line).parent) for line in out.strip().splitlines()[-3:]]
    assert [r["status"] for r in reports] == ["success"] * 3
    for report, night in zip(reports, NIGHTS, strict=True):
        read = report["stages"]["ingest"]["window"][0]
        assert read["values"] == {"window_start": night, "next_ds": _next(night)} and read["rows"] == 800
        assert report["promotion"]["outcome"] == "awaiting_approval"
    assert reports[2]["stages"]["wait"]["status"] == "success"
    # the backfill ended with three decisions open, side by side
    wait_for(lambda: [run["approve"] for run in _gate_runs(env, extra).values()] == ["awaiting_input"] * 3, 120,
             "three approval runs awaiting input", describe=lambda: _gate_runs(env, extra))
    assert "champion" not in _registry(env).get_registered_model(MODEL).aliases


def _next(day: str) -> str:
    import datetime as dt

    return (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat()


def _decided(env: AirflowEnv, extra: dict, night: str, dag_id: str = GATE) -> dict:
    """Wait for a night's approval run to finish; its night's report's promotion."""
    wait_for(lambda: _gate_runs(env, extra, dag_id)[night]["state"] in ("success", "failed"), RUN_TIMEOUT_S,
             f"the decision on night {night}", describe=lambda: _gate_runs(env, extra, dag_id)[night])
    run = _gate_runs(env, extra, dag_id)[night]
    assert run["state"] == "success", env.task_states(run["dag_run_id"], dag_id)
    return read_report(RunPaths.of(env.data_root, run["conf"]["dag_id"], run["conf"]["run_id"]).root)["promotion"]


def _respond(env: AirflowEnv, extra: dict, night: str, option: str) -> None:
    """Answer a night's question over the REST API, as a script or another UI would."""
    run_id = urllib.parse.quote(_gate_runs(env, extra)[night]["dag_run_id"], safe="")
    env.api(extra, f"/api/v2/dags/{GATE}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails",
            {"chosen_options": [option], "params_input": {}}, "PATCH")


def test_a_person_approves_in_the_browser_and_answers_over_the_api(gate):
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing (`make browser` installs it)") if os.environ.get("CI") else \
            pytest.skip(f"no browser: {CHROMIUM} is not installed")
    env, extra, _ = gate
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{extra['AIRFLOW__API__PORT']}"
    night = NIGHTS[-1]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        try:
            page.goto(base)
            page.get_by_label(re.compile("username", re.I)).fill("admin")
            page.get_by_label(re.compile("password", re.I)).fill(json.loads((env.home / "passwords.json").read_text())
                                                                  ["admin"])
            page.get_by_role("button", name=re.compile("sign in|log in|login", re.I)).click()
            page.wait_for_url(re.compile(r"^(?!.*auth/login).*$"))
            page.get_by_text("Required Actions").first.click()  # the home page's count of open questions
            page.get_by_text("View all required actions").click()
            page.get_by_role("link", name=re.compile(rf"^Promote {MODEL} version 3 to")).click()
            evidence = page.get_by_text("Approve moves champion to version 3")
            evidence.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "01-evidence.png"), full_page=True)
            text = page.inner_text("body")
            for seen in ("candidate, version 3", "none yet: this would be the first", "Drift:", "Validation: suite",
                         "22 of 22 expectations passed", "Compression (chosen:", "onnx_int8"):
                assert seen in text, seen
            docs = page.get_by_role("link", name="Data docs").get_attribute("href")
            assert page.request.get(base + docs).ok  # the evidence's link, behind the same login
            page.get_by_role("button", name="Approve").click()
            page.get_by_text(re.compile("response successful", re.I)).wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "02-approved.png"), full_page=True)
        finally:
            page.screenshot(path=str(ARTIFACTS / "last.png"))
            browser.close()
    approved = _decided(env, extra, night)
    assert approved["outcome"] == "approved" and approved["approval"]["decided_by"] == "admin"
    registry = _registry(env)
    assert registry.get_registered_model(MODEL).aliases == {"candidate": 3, "champion": 3}
    tags = registry.get_model_version(MODEL, "3").tags
    assert tags["lepton.promotion"] == "approved" and tags["lepton.promotion.decided_by"] == "admin"
    events = env.api(extra, f"/api/v2/assets/events?source_dag_id={GATE}")["asset_events"]
    assert [(e["extra"]["model_version"], e["extra"]["ds"]) for e in events] == [("3", night)]

    _respond(env, extra, NIGHTS[0], "Approve")  # too late: champion moved since night 1 was compared
    superseded = _decided(env, extra, NIGHTS[0])
    assert superseded["outcome"] == "superseded" and "champion moved to version 3" in superseded["approval"]["reason"]
    _respond(env, extra, NIGHTS[1], "Reject")
    rejected = _decided(env, extra, NIGHTS[1])
    assert rejected["outcome"] == "rejected" and rejected["approval"]["decided_by"] == "admin"
    assert registry.get_registered_model(MODEL).aliases["champion"] == 3  # neither moved it
    assert registry.get_run(_report_run(env, NIGHTS[1])).data.tags["lepton.promotion"] == "rejected"
    assert len(env.api(extra, f"/api/v2/assets/events?source_dag_id={GATE}")["asset_events"]) == 1


def _report_run(env: AirflowEnv, night: str) -> str:
    """The MLflow run of a night."""
    return read_report(RunPaths.of(env.data_root, DAG, f"backfill__{night}T03:15:00+00:00").root)["mlflow"]["run_id"]


def test_a_question_nobody_answers_rejects_at_its_timeout(gate):
    env, extra, _ = gate
    timed_out = _decided(env, extra, NIGHTS[0], HURRIED_GATE)
    assert timed_out["outcome"] == "timed_out" and timed_out["approval"]["decided_by"] is None
    registry = _registry(env)
    assert "champion" not in registry.get_registered_model("wh-hurried").aliases
    assert registry.get_model_version("wh-hurried", "1").tags["lepton.promotion.decided_by"] == "(timeout)"
