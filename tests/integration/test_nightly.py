"""Nightly for real, under Airflow's real scheduler and triggerer (LocalExecutor), with the bundled sensors
pipeline reading one daily partition per night:

- `lepton backfill` of three nights from a plain shell: each night reads only its day, three model versions,
  the shifted night raises the drift alarm (warn) and tells a real SMTP server and a real HTTP receiver; a
  rerun of one night changes only that night and duplicates nothing in MLflow;
- a night whose file lands while its run is deferred in the triggerer: it waits, then succeeds (warm start);
  the same night from scratch, side by side; and, in this process on the snapshot that night took (not under the
  scheduler), a champion whose shape no longer fits falls back to scratch;
- a night that never lands: a clean failure naming the day, nothing registered, a failure notification;
- drift over `drift_max` with `drift_action: fail`: the run stops before training, nothing registered;
- first, the same readings in a PostgreSQL table (`lepton_sensors_warehouse`): a three-night `lepton backfill`,
  each night reading its day's rows, the third night's rows landing while its `wait` is deferred (the triggerer
  polls the table); every candidate waits for a person in its own run of `lepton_sensors_warehouse_approval`, and
  the backfill ends without waiting for a decision. Chromium logs in, opens Required Actions, reads the newest
  night's evidence and approves it (`champion` moves, the Asset is published, the webhook told); over the REST API
  the middle night is rejected; the oldest, left unanswered, times out (rejected by default) while the sensors'
  scenarios run;
- the scheduler killed (SIGKILL) while `lepton backfill` waits: it fails naming the pending night.

The scenarios share one Airflow (starting one costs a minute; a second beside it, CPU the suite does not have) and
one Dask cluster (`dask_default`, as an operator's external cluster: a run's own, started by its setup task, costs
a run about 14 s of CPU; that path is test_scheduler.py's), and run in order: later nights have the earlier
champions.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.core.storage import RunPaths, read_json
from lepton_tasks.infra.cluster import stop_run_cluster
from lepton_tasks.infra.connections import dask_connection_env
from lepton_tasks.ml import champion
from lepton_tasks.orchestration import result_links as links
from lepton_tasks.tools.airflow_env import (
    BIN,
    RUN_TIMEOUT_S,
    AirflowEnv,
    free_port,
    read_report,
    scratch_database,
    wait_for,
)
from lepton_tasks.tools.backfill import RETRY_S
from lepton_tasks.tools.demo_data import load_sensor_days, make_sensor_day, write_sensor_day
from lepton_tasks.tools.services import postgres_connection
from tests.conftest import postgres_server_url

pytestmark = pytest.mark.slow

DAG = "lepton_sensors"
SCORE_DAG = "lepton_sensors_score"
MODEL = "lepton-sensors"
SMALL = {"num_shards": 2, "local_epochs": 2, "hidden_size": 16}
WH_DAG, GATE = "lepton_sensors_warehouse", "lepton_sensors_warehouse_approval"
GATE_TIMEOUT_S = 240  # night 1's question times out while the sensors' scenarios run; nights 2 and 3 are answered
WH_MODEL = "lepton-sensors-warehouse"
WH_NIGHTS = ("2026-11-10", "2026-11-11", "2026-11-12")
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LEPTON_TEST_ARTIFACTS", REPO_ROOT / "var" / "test-artifacts")) / "approval"


class Inbox:
    """A real SMTP server (aiosmtpd) and a real HTTP receiver on loopback ports, keeping what they get."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.mails: list = []
        self.hooks: list[dict] = []
        inbox = self

        class Mailbox:
            async def handle_DATA(self, server, session, envelope):
                from email import message_from_bytes, policy

                inbox.mails.append(message_from_bytes(envelope.content, policy=policy.default))
                return "250 OK"

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):
                inbox.hooks.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.smtp = Controller(Mailbox(), hostname="127.0.0.1", port=free_port())
        self.http = ThreadingHTTPServer(("127.0.0.1", free_port()), Hook)

    def __enter__(self) -> Inbox:
        self.smtp.start()
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.smtp.stop()
        self.http.shutdown()

    def connections(self) -> dict[str, str]:
        smtp = {"conn_type": "smtp", "host": "127.0.0.1", "port": self.smtp.port,
                "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 1}}
        hook = {"conn_type": "http", "host": "127.0.0.1", "port": self.http.server_address[1], "schema": "http"}
        return {"AIRFLOW_CONN_LEPTON_SMTP": json.dumps(smtp), "AIRFLOW_CONN_LEPTON_HOOK": json.dumps(hook)}

    def events(self, run_id: str) -> set[str]:
        """The events both channels reported for a run (the webhook's JSON names it; the mail's subject too)."""
        hooked = {h["event"] for h in self.hooks if h["run_id"] == run_id}
        mailed = {e for m in self.mails for e, word in (("failure", "failed"), ("champion_change", "new champion"),
                                                        ("drift", "drift")) if run_id in m["Subject"]
                  and word in m["Subject"]}
        return hooked & mailed


def _spec_folder(tmp: Path) -> Path:
    """The bundled sensors spec, smaller, without waiting by default (the scheduled run that unpausing starts
    for today fails at once: no data for today), and telling the test's inbox."""
    spec = yaml.safe_load((REPO_ROOT / "dags" / "pipelines" / f"{DAG}.yaml").read_text())
    spec["training"].update(SMALL)
    spec["merge"]["merge_rounds"] = 2
    spec["source"]["wait"] = {"timeout_minutes": 0, "poke_seconds": 2}
    spec["notify"] = {"on": ["failure", "champion_change", "drift"],
                      "email": {"conn_id": "lepton_smtp", "to": ["ml-team@example.com"]},
                      "webhook": {"conn_id": "lepton_hook", "endpoint": "/hooks/lepton"}}
    folder = tmp / "pipelines"
    folder.mkdir()
    (folder / f"{DAG}.yaml").write_text(yaml.safe_dump(spec))
    _warehouse_specs(folder)
    return folder


def _warehouse_specs(folder: Path) -> None:
    """The bundled warehouse spec, smaller, one day a night, telling the inbox's webhook of a new champion, its
    questions timing out in GATE_TIMEOUT_S."""
    spec = yaml.safe_load((REPO_ROOT / "dags" / "pipelines" / f"{WH_DAG}.yaml").read_text())
    spec["notify"] = {"on": ["champion_change"], "webhook": {"conn_id": "lepton_hook", "endpoint": "/hooks/lepton"}}
    spec["training"].update(num_shards=1, local_epochs=1, hidden_size=16)  # one shard a night
    spec["merge"]["merge_rounds"] = 1
    spec["source"].update(window_days=1, wait={"timeout_minutes": 10, "poke_seconds": 2})
    spec["promotion"]["timeout_hours"] = GATE_TIMEOUT_S / 3600
    (folder / f"{WH_DAG}.yaml").write_text(yaml.safe_dump(spec))


@pytest.fixture(scope="module")
def warehouse_url():
    """A throwaway PostgreSQL database: the warehouse, its sensor table holding the first two nights."""
    with scratch_database(postgres_server_url("the warehouse nights"), "lepton_nightly") as url:
        _land(url, list(WH_NIGHTS[:2]))  # the third night lands while its run waits
        yield url


def _land(url: sa.URL, days: list[str]) -> None:
    engine = sa.create_engine(url)
    load_sensor_days(engine, days, 800)
    engine.dispose()


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, warehouse_url, dask_client):
    tmp = tmp_path_factory.mktemp("nightly")
    env = AirflowEnv.sqlite(tmp)
    for day in ("2026-11-10", "2026-11-11", "2026-11-12"):
        write_sensor_day(env.data_root / "landing" / "sensors", day)
    env.migrate()
    with Inbox() as inbox:
        extra = {"LEPTON_PIPELINES_DIR": str(_spec_folder(tmp)), **inbox.connections(),
                 "AIRFLOW_CONN_LEPTON_WAREHOUSE": postgres_connection(warehouse_url),
                 **_dask_connection(dask_client)}
        with env.serving(DAG, **extra) as served:
            both = {**extra, **served}
            env.wait_serialized(SCORE_DAG)
            env.unpause(both, SCORE_DAG)  # it runs on each new champion from now on
            yield env, both, inbox


def _dask_connection(client) -> dict[str, str]:
    """`dask_default` naming the module's cluster: every night trains there, as on an operator's own cluster (a
    run's own local cluster, started and stopped by its tasks, is test_scheduler.py's)."""
    address = urllib.parse.urlsplit(client.scheduler.address)
    return dask_connection_env(address.hostname, address.port)


def _registry(env: AirflowEnv):
    from mlflow import MlflowClient

    return MlflowClient(env.mlflow_uri)


def _versions(env: AirflowEnv) -> list:
    return sorted(_registry(env).search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))


def _parent_runs(env: AirflowEnv, run_id: str) -> list:
    client = _registry(env)
    experiment = client.get_experiment_by_name(DAG)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.`lepton.dag_run_id` = '{run_id}' and "
                              "tags.`mlflow.parentRunId` IS NULL")


def _backfill(env: AirflowEnv, extra: dict, first: str, last: str) -> tuple[subprocess.CompletedProcess, list]:
    """`.venv/bin/lepton backfill` from a plain shell; its last lines are the nights' report paths."""
    done = subprocess.run([str(BIN / "lepton"), "backfill", DAG, "--from", first, "--to", last],
                          env=env.env(**extra), capture_output=True, text=True, timeout=1800, cwd="/")
    return done, done.stdout.strip().splitlines()


def _served(env: AirflowEnv, extra: dict, path: str, token: str | None = None) -> tuple[int, str]:
    """GET a path of the api-server (as a browser following an extra link would), with a token or without."""
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{extra['AIRFLOW__API__PORT']}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def _trigger(env: AirflowEnv, extra: dict, run_id: str, logical_date: str, conf: dict) -> None:
    env.trigger(extra, run_id, conf, logical_date, DAG)


def _finished(env: AirflowEnv, run_id: str) -> tuple[str, dict]:
    state = env.finished_state(run_id, RUN_TIMEOUT_S, DAG)
    return state, read_report(env.data_root / DAG / run_id)


def _gate_runs(env: AirflowEnv, extra: dict, dag_id: str = GATE) -> dict[str, dict]:
    """The approval runs by night, each with its `approve` task's state."""
    runs = env.api(extra, f"/api/v2/dags/{dag_id}/dagRuns")["dag_runs"]
    return {run["conf"]["ds"]: {**run, "approve": env.task_state(run["dag_run_id"], "approve", dag_id)}
            for run in runs}


def test_a_backfill_from_the_warehouse_asks_a_person_for_each_night(nightly, warehouse_url):
    env, extra, inbox = nightly
    command = [str(BIN / "lepton"), "backfill", WH_DAG, "--from", WH_NIGHTS[0], "--to", WH_NIGHTS[-1]]
    backfill = subprocess.Popen(command, env=env.env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/")
    third = f"backfill__{WH_NIGHTS[-1]}T03:15:00+00:00"
    wait_for(lambda: _still_running(backfill, "the third night waited") and
             env.task_state(third, "wait", WH_DAG) == "deferred", RUN_TIMEOUT_S * 2,
             "the third night to wait, deferred, for its rows", describe=lambda: env.task_states(third, WH_DAG))
    _land(warehouse_url, [WH_NIGHTS[-1]])  # the triggerer's next look finds them
    out, err = backfill.communicate(timeout=RUN_TIMEOUT_S * 3)
    assert backfill.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}\n{env.component_logs()}"
    reports = [read_report(Path(line).parent) for line in out.strip().splitlines()[-3:]]
    assert [r["status"] for r in reports] == ["success"] * 3
    for report, night in zip(reports, WH_NIGHTS, strict=True):
        read = report["stages"]["ingest"]["window"][0]
        assert read["values"] == {"window_start": night, "next_ds": _next(night)} and read["rows"] == 800
        assert report["promotion"]["outcome"] == "awaiting_approval"
    assert reports[2]["stages"]["wait"]["status"] == "success"
    # the backfill ended with three decisions open, side by side
    wait_for(lambda: [run["approve"] for run in _gate_runs(env, extra).values()] == ["awaiting_input"] * 3, 120,
             "three approval runs awaiting input", describe=lambda: _gate_runs(env, extra))
    assert "champion" not in _registry(env).get_registered_model(WH_MODEL).aliases


def _still_running(backfill: subprocess.Popen, before: str) -> bool:
    """True while `lepton backfill` runs; its output in the failure if it ended before `before`."""
    if backfill.poll() is not None:
        out, err = backfill.communicate()
        raise AssertionError(f"lepton backfill exited {backfill.returncode} before {before}:\n{out[-2000:]}\n"
                             f"{err[-3000:]}")
    return True


def _next(day: str) -> str:
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


def test_a_person_approves_in_the_browser_and_answers_over_the_api(nightly):
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing (`make browser` installs it)") if os.environ.get("CI") else \
            pytest.skip(f"no browser: {CHROMIUM} is not installed")
    env, extra, inbox = nightly
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{extra['AIRFLOW__API__PORT']}"
    night = WH_NIGHTS[-1]
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
            page.get_by_role("link", name=re.compile(rf"^Promote {WH_MODEL} version 3 to")).click()
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
    assert registry.get_registered_model(WH_MODEL).aliases == {"candidate": 3, "champion": 3}
    tags = registry.get_model_version(WH_MODEL, "3").tags
    assert tags["lepton.promotion"] == "approved" and tags["lepton.promotion.decided_by"] == "admin"
    events = env.api(extra, f"/api/v2/assets/events?source_dag_id={GATE}")["asset_events"]
    assert [(e["extra"]["model_version"], e["extra"]["ds"]) for e in events] == [("3", night)]
    wait_for(lambda: _told(inbox), 60, "the champion_change notification")
    told = _told(inbox)[0]  # the nights' own runs moved no champion, so told no one
    assert (told["event"], told["dag_id"]) == ("champion_change", GATE)
    assert f"{WH_MODEL} version 3 is now champion (was none): approved by admin" in told["text"]

    _respond(env, extra, WH_NIGHTS[1], "Reject")
    rejected = _decided(env, extra, WH_NIGHTS[1])
    assert rejected["outcome"] == "rejected" and rejected["approval"]["decided_by"] == "admin"
    assert registry.get_registered_model(WH_MODEL).aliases["champion"] == 3  # it did not move
    assert registry.get_run(_report_run(env, WH_NIGHTS[1])).data.tags["lepton.promotion"] == "rejected"
    assert len(env.api(extra, f"/api/v2/assets/events?source_dag_id={GATE}")["asset_events"]) == 1
    assert len(_told(inbox)) == 1  # nor told anyone


def _told(inbox: Inbox, pipeline: str = WH_DAG) -> list[dict]:
    return [hook for hook in inbox.hooks if hook["pipeline"] == pipeline]


def _report_run(env: AirflowEnv, night: str) -> str:
    """The MLflow run of a night."""
    return read_report(RunPaths.of(env.data_root, WH_DAG, f"backfill__{night}T03:15:00+00:00").root)["mlflow"]["run_id"]


def test_backfill_three_nights_then_rerun_one(nightly):
    env, extra, inbox = nightly
    done, lines = _backfill(env, extra, "2026-11-10", "2026-11-12")
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{env.component_logs()}"
    reports = [Path(line) for line in lines[-3:]]
    assert all(r.name == "report.json" and r.is_file() for r in reports), lines[-5:]
    nights = [read_report(r.parent) for r in reports]
    assert [n["status"] for n in nights] == ["success"] * 3

    for night, day in zip(nights, ("2026-11-10", "2026-11-11", "2026-11-12"), strict=True):
        window = night["stages"]["ingest"]["window"]
        assert [w["day"] for w in window] == [day]  # date order, each night only its own day
        assert [Path(f["path"]).parent.name for f in window[0]["files"]] == [day]
        assert all(len(f["sha256"]) == 64 for f in window[0]["files"])
        assert night["stages"]["wait"]["status"] == "success"

    versions = _versions(env)
    assert len(versions) == 3
    assert [v.tags["lepton.window"] for v in versions] == [f"{d}..{d}" for d in ("2026-11-10", "2026-11-11",
                                                                                "2026-11-12")]
    assert [v.tags["lepton.init_from"].split(":")[0] for v in versions] == ["scratch", "champion", "champion"]

    # the shifted night (line C's pressure sensors read 35% high): the alarm, the figures, the report, the mail
    first, shifted = nights[0]["stages"]["drift"], nights[2]["stages"]["drift"]
    assert first["max_psi"] is None and "no champion" in first["note"]
    assert shifted["alarm"] is True and shifted["worst"] == "pressure_bar" and shifted["max_psi"] > 0.25
    assert nights[1]["stages"]["drift"]["alarm"] is False
    assert "Drift report" in Path(shifted["report_path"]).read_text()
    link = links.drift_report_url(DAG, nights[2]["run_id"])  # the *Drift report* extra link, behind the login
    assert _served(env, extra, link)[0] in (401, 403)
    status, page = _served(env, extra, link, env.token(extra))
    assert status == 200 and "pressure_bar" in page
    assert nights[2]["metrics"]["drift.max_psi"] == shifted["max_psi"]
    assert "drift" in inbox.events(nights[2]["run_id"])
    assert "champion_change" in inbox.events(nights[0]["run_id"])
    lineage = _registry(env).list_artifacts(versions[2].run_id, "drift")
    assert {Path(a.path).name for a in lineage} == {"profile.json", "report.html"}

    # rerunning the middle night: the same DAG run again, the same MLflow run and version; the others untouched
    untouched = {r: r.read_bytes() for r in (reports[0], reports[2])}
    aliases = _registry(env).get_registered_model(MODEL).aliases
    done, lines = _backfill(env, extra, "2026-11-11", "2026-11-11")
    assert done.returncode == 0, done.stdout[-3000:]
    assert Path(lines[-1]) == reports[1]
    rerun = read_report(reports[1].parent)
    assert rerun["status"] == "success" and rerun["mlflow"]["promotion"]["outcome"] == "rerun"
    assert _registry(env).get_registered_model(MODEL).aliases == aliases  # a rerun night moves no alias
    assert len(_versions(env)) == 3
    assert len(_parent_runs(env, nights[1]["run_id"])) == 1
    assert all(r.read_bytes() == before for r, before in untouched.items())


def _score_runs(env: AirflowEnv) -> list[tuple[str, str, str]]:
    """(run_id, state, run_type) of the consumer DAG's runs, from the metadata DB."""
    import sqlalchemy as sa

    engine = sa.create_engine(env.sql_alchemy_conn)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(
                "SELECT run_id, state, run_type FROM dag_run WHERE dag_id = :dag"), {"dag": SCORE_DAG})]
    finally:
        engine.dispose()


def test_each_new_champion_scores_its_night_in_the_pipelines_consumer_dag(nightly):
    import pandas as pd

    env, _, _ = nightly

    def scored() -> list:
        return [r for r in _score_runs(env) if r[2] == "asset_triggered" and r[1] == "success"]

    wait_for(lambda: bool(scored()), RUN_TIMEOUT_S, f"an asset-triggered {SCORE_DAG} run",
             describe=lambda: _score_runs(env))
    run_id = scored()[0][0]
    predictions = pd.read_parquet(RunPaths.of(env.data_root, SCORE_DAG, run_id).stage("score") / "predictions.parquet")
    assert len(predictions) == 1500 and set(predictions["prediction"]) <= {"0", "1"}  # that night's rows
    client = _registry(env)
    experiment = client.get_experiment_by_name(DAG)
    runs = client.search_runs([experiment.experiment_id], f"tags.`lepton.kind` = 'scoring' and "
                              f"tags.`lepton.dag_run_id` = '{run_id}'")
    assert len(runs) == 1 and runs[0].data.metrics["scored_rows"] == 1500
    shares = [v for k, v in runs[0].data.metrics.items() if k.startswith("prediction.share.")]
    assert len(shares) == 2 and abs(sum(shares) - 1) < 1e-9


def test_late_file_waits_in_the_triggerer_and_warm_vs_scratch(nightly):
    from lepton_tasks.config.specs import load_spec
    from lepton_tasks.ml.models import load_checkpoint
    from lepton_tasks.orchestration import pipeline

    env, extra, _ = nightly
    champion_before = _registry(env).get_model_version_by_alias(MODEL, "champion")
    _trigger(env, extra, "late_night", "2026-11-20T03:00:00+00:00",
             {"wait_timeout_minutes": 5, "wait_poke_seconds": 2, "init_from": "champion"})
    wait_for(lambda: env.task_state("late_night", "wait", DAG) == "deferred", 300, "the wait task to defer",
             describe=lambda: env.task_states("late_night", DAG))
    assert env.run_state("late_night", DAG) == "running"
    write_sensor_day(env.data_root / "landing" / "sensors", "2026-11-20")  # the day lands while it waits
    state, warm = _finished(env, "late_night")
    assert state == "success", env.component_logs()
    assert warm["stages"]["wait"]["status"] == "success"

    _trigger(env, extra, "scratch_night", "2026-11-20T04:00:00+00:00", {"init_from": "scratch"})
    state, scratch = _finished(env, "scratch_night")
    assert state == "success", env.component_logs()

    start = warm["stages"]["shard"]["warm_start"]
    assert start["version"] == str(champion_before.version) and "starts from champion" in start["reason"]
    assert scratch["stages"]["shard"]["warm_start"] == {"init_from": "scratch", "reason": "init_from is scratch",
                                                         "version": None, "weights": None, "encoder": None}
    warm_init = load_checkpoint(env.data_root / DAG / "late_night" / "train" / "init.safetensors")
    champion_weights = load_checkpoint(Path(start["weights"]))[0]
    assert warm_init[1] == {"from_champion_version": start["version"]}
    assert all((warm_init[0][k] == champion_weights[k]).all() for k in warm_init[0])
    assert load_checkpoint(env.data_root / DAG / "scratch_night" / "train" / "init.safetensors")[1] == {"seed": "42"}
    tags = {r: _parent_runs(env, r)[0].data.tags for r in ("late_night", "scratch_night")}
    assert tags["late_night"]["lepton.init_from"] == f"champion:{start['version']}"
    assert tags["scratch_night"]["lepton.init_from"] == "scratch"

    # a champion whose shape no longer fits this run (another hidden size): scratch, and the reason said
    loaded = load_spec(Path(extra["LEPTON_PIPELINES_DIR"]) / f"{DAG}.yaml")
    ctx = pipeline.context(loaded, "what_if", {"init_from": "champion", "hidden_size": 24}, DAG, "2026-11-20")
    taken = json.loads((env.data_root / DAG / "late_night" / "champion" / "snapshot.json").read_text())
    start = champion.warm_start(champion.Snapshot(champion.ChampionSnapshot(**taken["champion"])), ctx.spec, ctx.params)
    assert start.weights is None and "hidden_size 16, this run 24" in start.reason


def test_a_night_that_never_lands_fails_cleanly(nightly):
    env, extra, inbox = nightly
    versions = len(_versions(env))
    _trigger(env, extra, "never_lands", "2026-11-21T03:00:00+00:00",
             {"wait_timeout_minutes": 0.25, "wait_poke_seconds": 2})
    state, report = _finished(env, "never_lands")
    assert state == "failed"
    assert report["failed_stage"] == "wait"
    assert "no data for 1 day(s)" in report["stages"]["wait"]["error"]
    assert "2026-11-21" in report["stages"]["wait"]["error"] and "after waiting 0.25 min" in \
        report["stages"]["wait"]["error"]
    assert report["stages"]["ingest"]["status"] == "not_run"
    assert len(_versions(env)) == versions and not _parent_runs(env, "never_lands")
    wait_for(lambda: "failure" in inbox.events("never_lands"), 120, "the failure notification")


def test_drift_over_the_threshold_stops_before_training(nightly):
    env, extra, inbox = nightly
    day = make_sensor_day("2026-11-22")
    recalibrated = day["line"] != "C"  # now lines A and B read 35% high too
    day.loc[recalibrated, "pressure_bar"] = (day.loc[recalibrated, "pressure_bar"] * 1.35).round(3)
    folder = env.data_root / "landing" / "sensors" / "2026-11-22"
    folder.mkdir(parents=True)
    day.to_parquet(folder / "readings.parquet", index=False)
    champion = _registry(env).get_registered_model(MODEL).aliases["champion"]
    versions = len(_versions(env))
    _trigger(env, extra, "drifted_night", "2026-11-22T03:00:00+00:00", {"drift_action": "fail"})
    state, report = _finished(env, "drifted_night")
    assert state == "failed" and report["failed_stage"] == "drift"
    drift = report["stages"]["drift"]
    assert drift["alarm"] is True and drift["worst"] == "pressure_bar" and drift["max_psi"] > drift["threshold"]
    assert "stopped before training, nothing registered" in drift["error"]
    assert Path(drift["report_path"]).is_file()
    assert report["stages"]["shard"]["status"] == "not_run"
    assert len(_versions(env)) == versions and not _parent_runs(env, "drifted_night")
    assert _registry(env).get_registered_model(MODEL).aliases["champion"] == champion
    wait_for(lambda: {"drift", "failure"} <= inbox.events("drifted_night"), 120, "the drift and failure notices")


def test_a_question_nobody_answers_rejects_at_its_timeout(nightly):
    """Night 1's question, open since the warehouse backfill, left unanswered while the scenarios above ran."""
    env, extra, inbox = nightly
    timed_out = _decided(env, extra, WH_NIGHTS[0])
    assert timed_out["outcome"] == "timed_out" and timed_out["approval"]["decided_by"] is None
    registry = _registry(env)
    assert registry.get_registered_model(WH_MODEL).aliases["champion"] == 3
    assert registry.get_model_version(WH_MODEL, "1").tags["lepton.promotion.decided_by"] == "(timeout)"
    assert len(_told(inbox)) == 1


def test_a_scheduler_killed_mid_backfill_is_named_not_waited_out(nightly):
    """Last in this file: it leaves the module's Airflow without a scheduler. Airflow's own health test (a
    heartbeat within scheduler_health_check_threshold, 10 s for the `lepton backfill` process here) says it is gone;
    the backfill fails naming the pending night instead of waiting out its 12-hour timeout."""
    import contextlib

    import psutil

    env, extra, _ = nightly
    write_sensor_day(env.data_root / "landing" / "sensors", "2026-11-24")
    backfill = subprocess.Popen([str(BIN / "lepton"), "backfill", DAG, "--from", "2026-11-24", "--to", "2026-11-24"],
                                env=env.env(**extra, AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD="10"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")

    # the create itself may wait up to RETRY_S for the scheduler to mark the earlier tests' backfill complete
    wait_for(lambda: _still_running(backfill, "its night started") and
             env.run_state("backfill__2026-11-24T03:00:00+00:00", DAG) == "running", RETRY_S + 120,
             "the backfilled night to start")
    scheduler = next(p for p in psutil.Process().children() if p.cmdline()[-1:] == ["scheduler"])
    orphans = scheduler.children(recursive=True)  # its executor's workers and the task running now
    scheduler.kill()
    try:
        _, err = backfill.communicate(timeout=120)
    finally:
        for process in orphans:
            with contextlib.suppress(psutil.Error):
                process.kill()
        for record in (env.data_root / DAG).glob("*/cluster/scheduler.json"):  # its teardown task never ran: the
            stop_run_cluster(read_json(record))  # run's cluster (in a session of its own) would idle for 30 min
    assert backfill.returncode == 1, err[-3000:]
    assert "scheduler stopped during the backfill of lepton_sensors (pending: 2026-11-24)" in err, err[-3000:]
