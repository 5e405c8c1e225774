"""An isolated Airflow for tests and benchmarks: the real CLI and components against their own metadata DB, data
root and MLflow store."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lepton_tasks.config.settings import REPO_ROOT
from lepton_tasks.tools.services import MLFLOW_SERVER_ENV, answers, scheduler_healthy

BIN = Path(sys.executable).parent
# The bound on one small DAG run under a real scheduler. A run in a loaded suite on a slow 2-core machine takes
# several times what it takes alone, and a tight bound failed passing runs there. A bound is paid only when the
# run is stuck, so it is generous; on timeout the task states are printed.
RUN_TIMEOUT_S = 1200


@dataclass
class AirflowEnv:
    """Environment for Airflow subprocesses: this repo's DAGs, a private database and data root."""

    home: Path
    data_root: Path
    sql_alchemy_conn: str
    mlflow_uri: str
    jwt_secret: str = field(default_factory=lambda: secrets.token_hex(16))  # shared by every component

    @classmethod
    def sqlite(cls, tmp: Path) -> AirflowEnv:
        data_root = tmp / "data"
        return cls(tmp, data_root, f"sqlite:///{tmp / 'airflow.db'}", f"sqlite:///{data_root / 'mlflow.db'}")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "LEPTON"))}
        env.update({
            "AIRFLOW_HOME": str(REPO_ROOT),  # airflow.cfg and dags/ come from the repo
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
            "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "3",  # a fault test waits for real retries, not 30 s each
            "LEPTON_DATA_ROOT": str(self.data_root),
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "GX_ANALYTICS_ENABLED": "false",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    def airflow(self, *args: str, timeout: int = 600, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / "airflow"), *args], env=self.env(**extra), capture_output=True, text=True,
                              timeout=timeout, cwd=self.home)
        if check and done.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n"
                                 f"{done.stderr[-4000:]}")
        return done

    def api(self, extra: dict[str, str], path: str, body: dict | None = None, method: str = "GET"):
        """One call to the serving api-server's REST API as its `admin` user (what the UI does): a JSON answer.
        A CLI call would start an `airflow` process, seconds of CPU, for the same."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{extra['AIRFLOW__API__PORT']}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token(extra)}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def token(self, extra: dict[str, str]) -> str:
        """A JWT for the `admin` user, whose password the api-server wrote to `home`."""
        password = json.loads((self.home / "passwords.json").read_text())["admin"]
        request = urllib.request.Request(f"http://127.0.0.1:{extra['AIRFLOW__API__PORT']}/auth/token", method="POST",
                                         data=json.dumps({"username": "admin", "password": password}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["access_token"]

    def trigger(self, extra: dict[str, str], run_id: str, conf: dict, logical_date: str | None = None,
                dag_id: str = "lepton_mnist1d") -> None:
        """Trigger a run through the REST API, as the UI's trigger form does."""
        self.api(extra, f"/api/v2/dags/{dag_id}/dagRuns",
                 {"dag_run_id": run_id, "logical_date": logical_date, "conf": conf}, "POST")

    def unpause(self, extra: dict[str, str], dag_id: str = "lepton_mnist1d") -> None:
        """Unpause a DAG through the REST API, as the UI's toggle does."""
        self.api(extra, f"/api/v2/dags/{dag_id}", {"is_paused": False}, "PATCH")

    def migrate(self) -> None:
        """`airflow db migrate`. On SQLite, this process's first migrated database is kept and copied for the
        later ones: the same Airflow makes the same empty schema, and each migration costs seconds of CPU."""
        sqlite = Path(self.sql_alchemy_conn.removeprefix("sqlite:///")) if self.sql_alchemy_conn.startswith(
            "sqlite:///") else None
        if sqlite is not None and _MIGRATED_SQLITE:
            shutil.copyfile(_MIGRATED_SQLITE[0], sqlite)
            return
        self.airflow("db", "migrate", timeout=300)
        if sqlite is not None:
            template = Path(tempfile.mkdtemp(prefix="lepton-migrated-")) / "airflow.db"
            shutil.copyfile(sqlite, template)
            _MIGRATED_SQLITE.append(template)

    @contextmanager
    def serving(self, dag_id: str = "lepton_mnist1d", **extra: str) -> Iterator[dict[str, str]]:
        """api-server, scheduler, dag-processor and triggerer (LocalExecutor) as their own processes, as in
        production, until the block ends; yields the environment that CLI calls against them need. Logs in
        `home`."""
        port = free_port()
        served = {"AIRFLOW__API__PORT": str(port), "AIRFLOW__CORE__EXECUTION_API_SERVER_URL":
                  f"http://127.0.0.1:{port}/execution/", "AIRFLOW__CORE__PARALLELISM": "4",
                  # the log servers' fixed ports (8793, 8794) would clash with a deployment tested beside this one
                  "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                  "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()), **extra}
        with ExitStack() as stack:
            for command in (("api-server", "--port", str(port)), ("scheduler",), ("dag-processor",), ("triggerer",)):
                log = stack.enter_context(open(self.home / f"{command[0]}.log", "w"))
                process = subprocess.Popen([str(BIN / "airflow"), *command], env=self.env(**served), stdout=log,
                                           stderr=subprocess.STDOUT, cwd=self.home)
                stack.callback(stop_component, process)
            self.wait_serialized(dag_id)
            # what the REST calls (`api`) need; the CLI reads the metadata DB without it
            wait_for(lambda: answers(f"http://127.0.0.1:{port}/api/v2/monitor/health"), 120,
                     "the api-server to answer", every=0.3)
            # as `make up`: a test may start with a command that needs a live scheduler (`lepton backfill`)
            wait_for(lambda: scheduler_healthy(f"http://127.0.0.1:{port}"), 180, "the scheduler's first heartbeat")
            yield served

    def wait_serialized(self, dag_id: str, timeout: float = 120) -> None:
        """Wait for the dag-processor to store `dag_id` (what the scheduler and `dags trigger` read), polling the
        metadata DB: `airflow dags details` every few seconds cost seconds of CPU a call."""
        wait_for(lambda: self._scalar("SELECT 1 FROM serialized_dag WHERE dag_id = :dag", dag=dag_id) is not None,
                 timeout, f"the dag-processor to serialise {dag_id}")

    def _rows(self, query: str, **params: str) -> list[tuple]:
        """The rows of a query on the metadata DB."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.sql_alchemy_conn)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(sa.text(query), params)]
        finally:
            engine.dispose()

    def _scalar(self, query: str, **params: str):
        """One value from the metadata DB (None: no row)."""
        rows = self._rows(query, **params)
        return rows[0][0] if rows else None

    def component_logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in self.home.glob("*.log"))

    def task_logs(self, part: str) -> str:
        """Every task log (every try) whose path has `part` in it, e.g. `task_id=train` or `run_id=nightly`."""
        return "\n".join(p.read_text() for p in (self.home / "logs").rglob("*.log") if part in str(p))

    def attempt_logs(self, run_id: str, task_id: str = "") -> dict[str, str]:
        """Each try's log (`attempt=N.log`: its text) of the run's task (of every task of the run without one)."""
        return {p.name: p.read_text() for p in (self.home / "logs").rglob("attempt=*.log")
                if f"run_id={run_id}/task_id={task_id}" in str(p)}

    def run_state(self, run_id: str, dag_id: str = "lepton_mnist1d") -> str | None:
        """The run's state, read from the metadata DB: polling with `airflow dags list-runs` would start an
        `airflow` process (seconds of CPU) every few seconds beside the run being measured."""
        return self._scalar("SELECT state FROM dag_run WHERE dag_id = :dag AND run_id = :run", dag=dag_id, run=run_id)

    def task_state(self, run_id: str, task_id: str, dag_id: str = "lepton_mnist1d") -> str | None:
        """A task instance's state, from the metadata DB."""
        return self._scalar("SELECT state FROM task_instance WHERE dag_id = :dag AND run_id = :run AND task_id = :task",
                            dag=dag_id, run=run_id, task=task_id)

    def task_states(self, run_id: str, dag_id: str = "lepton_mnist1d") -> dict[str, str | None]:
        """Every task instance's state in the run (map index appended to mapped tasks), from the metadata DB."""
        rows = self._rows("SELECT task_id, map_index, state FROM task_instance WHERE dag_id = :dag AND run_id = :run "
                          "ORDER BY task_id, map_index", dag=dag_id, run=run_id)
        return {task if index < 0 else f"{task}[{index}]": state for task, index, state in rows}

    def finished_state(self, run_id: str, timeout: float, dag_id: str = "lepton_mnist1d") -> str:
        """Wait for the run to end (under a scheduler); its final state."""
        wait_for(lambda: self.run_state(run_id, dag_id) in ("success", "failed"), timeout,
                 f"{dag_id} run {run_id} to finish", describe=lambda: self.task_states(run_id, dag_id))
        return self.run_state(run_id, dag_id)

    def runs(self, dag_id: str = "lepton_mnist1d") -> set[Path]:
        return set((self.data_root / dag_id).glob("*/"))

    def lepton_run(self, conf: dict, dag_id: str = "lepton_mnist1d") -> tuple[subprocess.CompletedProcess, Path]:
        """`.venv/bin/lepton run` as from cron or a plain shell: no virtualenv on PATH, no AIRFLOW_HOME, no keys
        in the environment, another working directory; only the variables that isolate this test's stores."""
        isolation = ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__LOGGING__BASE_LOG_FOLDER",
                     "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", "LEPTON_DATA_ROOT", "MLFLOW_TRACKING_URI")
        env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/bin:/bin",
               **{k: v for k, v in self.env().items() if k in isolation}}
        done = subprocess.run([str(BIN / "lepton"), "run", dag_id, "-c", json.dumps(conf)], env=env,
                              capture_output=True, text=True, timeout=900, cwd=self.home)
        assert done.returncode == 0, f"lepton run exited {done.returncode}:\n{done.stdout[-4000:]}\n" \
                                     f"{done.stderr[-4000:]}"
        report = Path(done.stdout.strip().splitlines()[-1])  # the README's promise: report.json is the last line
        assert report.name == "report.json" and report.is_file(), done.stdout[-2000:]
        return done, report.parent

    def dags_test(self, conf: dict, logical_date: str, check: bool = True, dag_id: str = "lepton_mnist1d",
                  **extra: str) -> tuple[subprocess.CompletedProcess, Path]:
        """Run the DAG once; returns the CLI result and the run folder it created."""
        before = self.runs(dag_id)
        done = self.airflow("dags", "test", dag_id, logical_date, "-c", json.dumps(conf), check=check, **extra)
        created = self.runs(dag_id) - before
        assert len(created) == 1, f"expected one new run folder, found {created}:\n{done.stdout[-3000:]}"
        return done, created.pop()


def read_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def write_demo(data_root: Path, samples: int) -> None:
    from lepton_tasks.tools.demo_data import write_mnist1d

    write_mnist1d(data_root / "landing" / "mnist1d", samples)


def unscheduled_specs(folder: Path, names: tuple[str, ...] = ("lepton_mnist1d",)) -> Path:
    """Copies of pipeline specs without their schedules (for LEPTON_PIPELINES_DIR), so that unpausing a DAG
    under a scheduler creates no run of its own: the only runs are the ones triggered."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = yaml.safe_load((REPO_ROOT / "dags" / "pipelines" / f"{name}.yaml").read_text())
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({**spec, "schedule": None}))
    return folder


def stop_component(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM an Airflow component and wait; a second SIGTERM, then SIGKILL, where it is still running (as `lepton
    down` does). Airflow 3.3's scheduler can lose a SIGTERM: its handler's `sys.exit` raised while Python runs a
    garbage-collection callback (SQLAlchemy's `_collection_gced`) is printed as "Exception ignored" and the scheduler
    runs on (seen once in a suite run)."""
    for stop in (process.terminate, process.terminate, process.kill):
        stop()
        try:
            process.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait(grace_s)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 1.0, describe=None) -> None:
    """Poll `predicate` every `every` seconds until it holds; fail naming `what` after `timeout` seconds, with what
    `describe()` says of the state then (task states, say). A predicate that starts an `airflow` process (seconds
    of CPU) polls every 3 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f": {describe()}" if describe else ""))


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# small enough for 2 CPU cores in well under a minute, still every stage for real
SMALL_CONF = {"num_shards": 2, "merge_rounds": 2, "local_epochs": 4, "hidden_size": 32, "model_kind": "cnn"}


_MIGRATED_SQLITE: list[Path] = []  # this process's first freshly migrated SQLite metadata DB (AirflowEnv.migrate)


class TrackingServer:
    """`mlflow server` on a free loopback port, with its own SQLite store and an artifact folder (or the
    `artifacts_destination` given, an object store whose credentials are in `env`: the server proxies it)."""

    def __init__(self, root: Path, artifacts_destination: str | None = None, env: dict[str, str] | None = None):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts_destination = artifacts_destination or str(root / "artifacts")
        self.env = env or {}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", self.artifacts_destination],
            env={**os.environ, **MLFLOW_SERVER_ENV, **self.env},
            stdout=subprocess.DEVNULL, stderr=(self.root / "server.log").open("ab"), start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not answer: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        import os

        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


@contextmanager
def scratch_database(server_url: str, prefix: str, driver: str = "postgresql+psycopg") -> Iterator:
    """A database of its own (`unique(prefix)`) on the PostgreSQL server at `server_url`: its SQLAlchemy URL with
    `driver`, and the database dropped at the end whatever happened."""
    import sqlalchemy as sa

    server = sa.make_url(server_url)
    name = unique(prefix)
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(drivername=driver, database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
