"""`lepton up` (what `make up` runs) and a person in a real browser.

The production deployment is started as `make up` starts it (Airflow's four processes and an MLflow server on
PostgreSQL, `dask scheduler` + `dask worker` processes), on free loopback ports and throwaway databases, with
CeleryExecutor on the local Redis (an `airflow celery worker` runs the tasks: the scale-out executor). Then
headless Chromium (Debian's, driven by Playwright) logs in to the Airflow UI, opens the pipeline, triggers it
from the form with changed params, waits for success, follows the task's extra link to MLflow and finds the
registered version there. The champion Asset starts the consumer DAG, which scores a batch. Meanwhile the other
bundled pipeline, house prices, whose demo data only `lepton up` writes, is triggered over the REST API with its
defaults and must succeed too. Screenshots land in `var/test-artifacts/browser/` (LEPTON_TEST_ARTIFACTS
overrides).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.tools.airflow_env import BIN, RUN_TIMEOUT_S, free_port, unscheduled_specs, wait_for, write_demo
from lepton_tasks.tools.demo_data import EXAMPLES
from lepton_tasks.tools.services import Deployment
from tests.conftest import postgres_server_url

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LEPTON_TEST_ARTIFACTS", REPO_ROOT / "var" / "test-artifacts")) / "browser"


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium (`make test` installs it where it can); missing, it fails in CI and skips elsewhere."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: CI runs the browser test (`make browser` installs Debian's chromium)")
    pytest.skip(f"no browser configured: {CHROMIUM} is not installed (`make browser` as root, or apt-get install "
                "chromium)")


def _drop_databases(deployment: Deployment) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(deployment.postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for purpose in ("airflow", "mlflow", "warehouse"):
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{deployment.db_prefix}_{purpose}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """The deployment, up; the nightly spec copied without its schedule so the only run is the one we trigger."""
    root = tmp_path_factory.mktemp("up")
    pipelines = unscheduled_specs(root / "pipelines", tuple(EXAMPLES))
    ports = {"LEPTON_AIRFLOW_PORT": free_port(), "LEPTON_MLFLOW_PORT": free_port(),
             "LEPTON_DASK_PORT": free_port(), "LEPTON_DASK_DASHBOARD_PORT": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "LEPTON"))}
    env.update({k: str(v) for k, v in ports.items()})
    env.update({"LEPTON_UP_DIR": str(root / "state"), "LEPTON_DATA_ROOT": str(root / "data"),
                "LEPTON_POSTGRES_URL": postgres_server_url("the production deployment"),
                "LEPTON_UP_DB_PREFIX": f"lepton_t{uuid.uuid4().hex[:8]}",
                "LEPTON_PIPELINES_DIR": str(pipelines), "LEPTON_DASK_WORKERS": "2",
                # CeleryExecutor on this machine's Redis: the scale-out executor, proven with the same deployment
                "LEPTON_EXECUTOR": "CeleryExecutor", "LEPTON_CELERY_BROKER_URL": "redis://127.0.0.1:6379/7"})
    write_demo(root / "data", 1500)
    started = subprocess.run([str(BIN / "lepton"), "up"], env=env, capture_output=True, text=True, timeout=400)
    up = Deployment.from_env(env)
    assert started.returncode == 0, f"lepton up failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
    yield up, env, started.stdout
    stopped = subprocess.run([str(BIN / "lepton"), "down"], env=env, capture_output=True, text=True, timeout=120)
    _drop_databases(up)
    assert stopped.returncode == 0 and "api-server" in stopped.stdout, stopped.stdout + stopped.stderr


def _api(deployment: Deployment, path: str, token: str | None = None, body: dict | None = None, method: str = "GET"):
    request = urllib.request.Request(f"{deployment.airflow_url}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def _token(deployment: Deployment) -> str:
    keys = json.loads((deployment.state / "login.json").read_text())
    return _api(deployment, "/auth/token", body={"username": keys["username"], "password": keys["password"]},
                method="POST")["access_token"]


def _runs(deployment: Deployment, token: str, dag_id: str) -> list[dict]:
    return _api(deployment, f"/api/v2/dags/{dag_id}/dagRuns?order_by=-run_after", token)["dag_runs"]


def test_up_prints_where_everything_is_and_refuses_anonymous_access(deployment):
    up, _, printed = deployment
    pids = json.loads((up.state / "pids.json").read_text())
    assert up.executor == "CeleryExecutor" and "celery-worker" in pids
    # airflow.cfg's 50 ms idle sleep is for PreloadingLocalExecutor, which waits for results itself
    assert psutil.Process(pids["scheduler"]).environ()["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"] == "1"
    for url in (up.airflow_url, up.mlflow_url, up.dashboard_url):
        assert url in printed
    assert str(up.state / "login.json") in printed and oct((up.state / "login.json").stat().st_mode)[-3:] == "600"
    password = json.loads((up.state / "login.json").read_text())["password"]
    assert password not in printed
    with pytest.raises(urllib.error.HTTPError) as refused:
        _api(up, "/api/v2/dags")
    assert refused.value.code == 401
    with urllib.request.urlopen(f"{up.mlflow_url}/health", timeout=10) as health:
        assert health.status == 200
    token = _token(up)
    dags = {d["dag_id"] for d in _api(up, "/api/v2/dags", token)["dags"]}
    assert {"lepton_mnist1d", "lepton_mnist1d_score"} <= dags


def test_a_person_triggers_from_the_form_and_follows_the_link_to_mlflow(chromium, deployment, house_prices_run):
    from playwright.sync_api import sync_playwright

    up, _, _ = deployment
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    token = _token(up)
    for dag_id in ("lepton_mnist1d", "lepton_mnist1d_score"):
        _api(up, f"/api/v2/dags/{dag_id}", token, {"is_paused": False}, "PATCH")
    password = json.loads((up.state / "login.json").read_text())["password"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        try:
            _log_in(page, up, password)
            run_id = _trigger_from_form(page, up, token)
            wait_for(lambda: _state(up, token, run_id) in ("success", "failed"), RUN_TIMEOUT_S, "the run",
                     describe=lambda: _task_states(up, token, run_id))
            assert _state(up, token, run_id) == "success", _task_states(up, token, run_id)
            version = _follow_model_version_link(page, context, up, run_id)
        finally:
            page.screenshot(path=str(ARTIFACTS / "last.png"))
            browser.close()
    conf = _api(up, f"/api/v2/dags/lepton_mnist1d/dagRuns/{run_id}", token)["conf"]
    assert conf["num_shards"] == 2 and conf["merge_rounds"] == 2  # the form's values reached the run
    assert version == "1"
    # the champion Asset started the consumer DAG, which scored a batch with the new champion
    wait_for(lambda: any(r["state"] == "success" for r in _runs(up, token, "lepton_mnist1d_score")), RUN_TIMEOUT_S,
             "the asset-triggered lepton_mnist1d_score run", describe=lambda: _runs(up, token, "lepton_mnist1d_score"))
    scored = _runs(up, token, "lepton_mnist1d_score")[0]
    assert scored["run_type"] == "asset_triggered"


@pytest.fixture(scope="module")
def house_prices_run(deployment) -> str:
    """The house-prices pipeline triggered over the REST API with its defaults (an empty conf), right after
    `lepton up`: nothing but `up` wrote its demo data. Its run id."""
    up, _, _ = deployment
    token = _token(up)
    _api(up, "/api/v2/dags/lepton_house_prices", token, {"is_paused": False}, "PATCH")
    run = _api(up, "/api/v2/dags/lepton_house_prices/dagRuns", token, {"logical_date": None, "conf": {}}, "POST")
    return run["dag_run_id"]


def test_every_bundled_pipeline_runs_from_the_api_with_its_defaults(deployment, house_prices_run):
    up, _, _ = deployment
    token = _token(up)
    path = f"/api/v2/dags/lepton_house_prices/dagRuns/{urllib.parse.quote(house_prices_run, safe='')}"
    wait_for(lambda: _api(up, path, token)["state"] in ("success", "failed"), RUN_TIMEOUT_S, "the house-prices run",
             describe=lambda: _task_states(up, token, house_prices_run, "lepton_house_prices"))
    assert _api(up, path, token)["state"] == "success", _task_states(up, token, house_prices_run,
                                                                     "lepton_house_prices")
    # its tasks started from a Celery worker that had imported the stage libraries before forking its pool
    assert "preloaded for the task processes" in (up.state / "logs" / "celery-worker.log").read_text()


def _log_in(page, up: Deployment, password: str) -> None:
    page.goto(up.airflow_url)
    page.get_by_label(re.compile("username", re.I)).fill("admin")
    page.get_by_label(re.compile("password", re.I)).fill(password)
    page.screenshot(path=str(ARTIFACTS / "01-login.png"))
    page.get_by_role("button", name=re.compile("sign in|log in|login", re.I)).click()
    page.wait_for_url(re.compile(r"^(?!.*auth/login).*$"))


def _trigger_from_form(page, up: Deployment, token: str) -> str:
    """Open the DAG, fill the trigger form (2 shards, 2 rounds, 2 epochs, 16 channels), trigger; the run id."""
    page.goto(f"{up.airflow_url}/dags/lepton_mnist1d")
    page.get_by_role("button", name=re.compile("^trigger", re.I)).first.click()
    dialog = page.get_by_role("dialog")
    for label, value in (("Shards", "2"), ("Merge rounds", "2"), ("Local epochs", "2"), ("Hidden size", "16")):
        field = dialog.get_by_role("spinbutton", name=re.compile(f"^{label}", re.I))
        field.fill(value)
    page.screenshot(path=str(ARTIFACTS / "02-trigger-form.png"), full_page=True)
    before = {r["dag_run_id"] for r in _runs(up, token, "lepton_mnist1d")}
    dialog.get_by_role("button", name=re.compile("^trigger$", re.I)).click()
    wait_for(lambda: {r["dag_run_id"] for r in _runs(up, token, "lepton_mnist1d")} - before, 60, "the new run")
    return next(r["dag_run_id"] for r in _runs(up, token, "lepton_mnist1d") if r["dag_run_id"] not in before)


def _state(up: Deployment, token: str, run_id: str) -> str:
    return _api(up, f"/api/v2/dags/lepton_mnist1d/dagRuns/{urllib.parse.quote(run_id, safe='')}", token)["state"]


def _task_states(up: Deployment, token: str, run_id: str, dag_id: str = "lepton_mnist1d") -> dict:
    path = f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
    return {t["task_id"]: t["state"] for t in _api(up, path, token)["task_instances"]}


def _follow_model_version_link(page, context, up: Deployment, run_id: str) -> str:
    """On the register task's details, click the extra link to MLflow; the version number MLflow shows."""
    page.goto(f"{up.airflow_url}/dags/lepton_mnist1d/runs/{urllib.parse.quote(run_id, safe='')}/tasks/register")
    page.get_by_role("link", name="Details").click()
    link = page.get_by_role("link", name="MLflow model version")
    link.wait_for(timeout=60_000)
    for name in ("MLflow run", "Data docs", "Dask dashboard"):
        assert page.get_by_role("link", name=name).count() == 1, name
    page.screenshot(path=str(ARTIFACTS / "03-extra-links.png"), full_page=True)
    href = link.get_attribute("href")
    assert href.startswith(up.mlflow_url), href
    with context.expect_page() as opened:
        link.click()
    mlflow_page = opened.value
    mlflow_page.get_by_text(re.compile(r"Version \d+")).first.wait_for(timeout=60_000)
    mlflow_page.get_by_text("lepton-mnist1d").first.wait_for(timeout=30_000)
    mlflow_page.screenshot(path=str(ARTIFACTS / "04-mlflow-model-version.png"), full_page=True)
    return re.search(r"/versions/(\d+)", mlflow_page.url).group(1)
