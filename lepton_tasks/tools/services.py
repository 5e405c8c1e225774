"""`make up` / `make down`: the local production deployment, every service its own process on loopback.

- Airflow 3 (api-server, scheduler, dag-processor, triggerer; LocalExecutor, preloading the stage libraries) on a
  PostgreSQL database;
- an MLflow tracking server on a PostgreSQL database, artifacts in `{state}/mlartifacts` or on an object store
  (LEPTON_ARTIFACTS_DESTINATION), proxied: only the server needs the store's credentials;
- a Dask cluster: `lepton dask-scheduler` and one `lepton dask-worker` process per worker (one for every GPU where
  torch can use one), each kept running by `lepton_tasks.tools.supervisor` (`lepton_tasks.tools.dask_hosts`);
- with LEPTON_EXECUTOR=CeleryExecutor, an `airflow celery worker` on the Redis broker LEPTON_CELERY_BROKER_URL
  (default the local Redis), results in the Airflow database.

The PostgreSQL server is named by LEPTON_POSTGRES_URL (default the local one); its databases are created once.
The Airflow login is `admin` with a password generated on first `up` and kept in `{state}/login.json` (mode
600, under git-ignored `var/`); the UI and the REST API refuse anonymous requests (SimpleAuthManager, JWT).
The pipelines reach MLflow and Dask through the Airflow connections `mlflow_default` and `dask_default`, set here
as environment variables, so they run unchanged. State, logs and PIDs live in `{state}` (default `var/up`).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lepton_tasks.config.settings import PRELOADING_EXECUTOR, REPO_ROOT, WAREHOUSE_CONN_ID, redact_uri
from lepton_tasks.core.errors import LeptonError
from lepton_tasks.core.storage import write_private
from lepton_tasks.core.store import SCRATCH_ENV, WorkArea
from lepton_tasks.infra.cluster import gpu_count
from lepton_tasks.infra.connections import dask_connection_env
from lepton_tasks.tools.airflow_home import BIN
from lepton_tasks.tools.dask_hosts import scheduler_command, worker_command

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
AIRFLOW_PROCESSES = ("api-server", "scheduler", "dag-processor", "triggerer")
BACKING_PREFIXES = ("mlflow", "dask-")  # stopped after Airflow
START_TIMEOUT_S = 180


class ServiceError(LeptonError):
    pass


@dataclass(frozen=True)
class Deployment:
    """Where the services listen and keep their state."""

    state: Path
    data_root: Path  # this host's folder of the working area (LEPTON_DATA_ROOT itself, unless that is a store)
    data_store: str | None = None  # LEPTON_DATA_ROOT where it is an object store's URL
    postgres_url: str = DEFAULT_POSTGRES
    db_prefix: str = "lepton"
    airflow_port: int = 8080
    mlflow_port: int = 5000
    dask_port: int = 8786
    dashboard_port: int = 8787
    dask_workers: int = 0  # 0: one per core
    executor: str = PRELOADING_EXECUTOR  # or CeleryExecutor: adds an `airflow celery worker` on the Redis broker
    celery_broker_url: str = "redis://127.0.0.1:6379/0"
    # where the MLflow server keeps artifacts, a folder or an object store (s3://bucket/prefix: the server alone
    # needs the store's credentials, its clients upload and download through it); default {state}/mlartifacts
    artifacts_destination: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Deployment:
        env = (os.environ if environ is None else environ).get
        state = Path(env("LEPTON_UP_DIR", REPO_ROOT / "var" / "up")).resolve()
        area = WorkArea.from_env(environ)
        return cls(state=state, data_root=area.local, data_store=area.store,
                   postgres_url=env("LEPTON_POSTGRES_URL", DEFAULT_POSTGRES),
                   db_prefix=env("LEPTON_UP_DB_PREFIX", "lepton"),
                   airflow_port=int(env("LEPTON_AIRFLOW_PORT", 8080)),
                   mlflow_port=int(env("LEPTON_MLFLOW_PORT", 5000)),
                   dask_port=int(env("LEPTON_DASK_PORT", 8786)),
                   dashboard_port=int(env("LEPTON_DASK_DASHBOARD_PORT", 8787)),
                   dask_workers=int(env("LEPTON_DASK_WORKERS", 0)),
                   executor=env("LEPTON_EXECUTOR", PRELOADING_EXECUTOR),
                   celery_broker_url=env("LEPTON_CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
                   artifacts_destination=env("LEPTON_ARTIFACTS_DESTINATION"))

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def mlflow_artifacts(self) -> str:
        return self.artifacts_destination or str(self.state / "mlartifacts")

    @property
    def dask_address(self) -> str:
        return f"tcp://127.0.0.1:{self.dask_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}/status"

    def database_url(self, purpose: str, driver: str = "postgresql") -> str:
        """The URL of database `{prefix}_{purpose}` on the deployment's server."""
        from sqlalchemy.engine import make_url

        return make_url(self.postgres_url).set(drivername=driver, database=f"{self.db_prefix}_{purpose}") \
            .render_as_string(hide_password=False)


def ensure_databases(deployment: Deployment,
                     purposes: tuple[str, ...] = ("airflow", "mlflow", "warehouse")) -> None:
    """Create the deployment's databases where missing; a clear error when no PostgreSQL answers."""
    import sqlalchemy as sa

    engine = sa.create_engine(deployment.postgres_url, isolation_level="AUTOCOMMIT",
                              connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            existing = {row[0] for row in conn.execute(sa.text("SELECT datname FROM pg_database"))}
            for purpose in purposes:
                name = f"{deployment.db_prefix}_{purpose}"
                if name not in existing:
                    conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as err:
        raise ServiceError(f"no PostgreSQL answers at {redact_uri(deployment.postgres_url)} "
                           "(set LEPTON_POSTGRES_URL to "
                           f"a server Lepton may create databases on): {err.orig}") from None
    finally:
        engine.dispose()


def login(deployment: Deployment) -> dict[str, str]:
    """The admin login and the shared JWT/API keys: generated once, kept in the state folder (mode 600)."""
    path = deployment.state / "login.json"
    if not path.exists():
        deployment.state.mkdir(parents=True, exist_ok=True)
        values = {"username": "admin", "password": secrets.token_urlsafe(18),
                  "jwt_secret": secrets.token_hex(32), "api_secret_key": secrets.token_hex(32)}
        write_private(path, json.dumps(values))
    return json.loads(path.read_text())


# MLflow's job runner (huey consumers for its GenAI jobs) starts beside the server by default: Lepton submits no
# such jobs, and its idle consumers took more CPU than the server itself
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def service_env(deployment: Deployment) -> dict[str, str]:
    """The environment every service (and so every task) runs with."""
    keys = login(deployment)
    passwords = deployment.state / "passwords.json"  # SimpleAuthManager's user file
    passwords.write_text(json.dumps({keys["username"]: keys["password"]}))
    passwords.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__", "MLFLOW_TRACKING"))}
    env.update({
        "AIRFLOW_HOME": str(REPO_ROOT),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": deployment.database_url("airflow", "postgresql+psycopg2"),
        "AIRFLOW__CORE__EXECUTOR": deployment.executor,
        # airflow.cfg's short idle sleep leans on PreloadingLocalExecutor's wait for results (see its module)
        **({} if deployment.executor == PRELOADING_EXECUTOR
           else {"AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "1"}),
        "AIRFLOW__CELERY__BROKER_URL": deployment.celery_broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{deployment.database_url('airflow')}",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{keys['username']}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__API__PORT": str(deployment.airflow_port),
        "AIRFLOW__API__BASE_URL": deployment.airflow_url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{deployment.airflow_url}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
        "AIRFLOW__API__SECRET_KEY": keys["api_secret_key"],
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(deployment.state / "logs" / "airflow"),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps({"conn_type": "http", "host": "127.0.0.1",
                                                   "port": deployment.mlflow_port}),
        **dask_connection_env("127.0.0.1", deployment.dask_port),
        **warehouse_env(deployment),
        "LEPTON_DATA_ROOT": deployment.data_store or str(deployment.data_root),
        **({SCRATCH_ENV: str(deployment.data_root)} if deployment.data_store else {}),
        "LEPTON_MLFLOW_UI_URL": deployment.mlflow_url,
        "LEPTON_DASK_DASHBOARD_URL": deployment.dashboard_url,
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        **MLFLOW_SERVER_ENV,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def warehouse_env(deployment: Deployment) -> dict[str, str]:
    """The warehouse example's connection: database `{prefix}_warehouse` on the deployment's PostgreSQL."""
    from sqlalchemy.engine import make_url

    return {f"AIRFLOW_CONN_{WAREHOUSE_CONN_ID.upper()}":
            postgres_connection(make_url(deployment.database_url("warehouse")))}


def postgres_connection(url, **changes) -> str:
    """An Airflow connection (AIRFLOW_CONN_* JSON) to the database at `url` (a SQLAlchemy URL), its fields changed
    as given."""
    return json.dumps({"conn_type": "postgres", "host": url.host, "port": url.port or 5432, "login": url.username,
                       "password": url.password, "schema": url.database, **changes})


def dask_commands(deployment: Deployment) -> dict[str, list[str]]:
    """The Dask scheduler and worker processes (`lepton dask-scheduler`, `lepton dask-worker`), by name."""
    scheduler = scheduler_command("127.0.0.1", deployment.dask_port, f"127.0.0.1:{deployment.dashboard_port}")
    on_loopback = ["--host", "127.0.0.1"]
    if gpu_count():
        return {"dask-scheduler": scheduler, "dask-worker": worker_command(deployment.dask_address, None, on_loopback)}
    # one process per worker: losing one (its nanny and all) leaves the others working
    count = deployment.dask_workers or os.cpu_count() or 1
    return {"dask-scheduler": scheduler,
            **{f"dask-worker-{i}": worker_command(deployment.dask_address, 1, [*on_loopback, "--name", f"worker-{i}"])
               for i in range(1, count + 1)}}


def commands(deployment: Deployment) -> dict[str, list[str]]:
    """Each service's command line, by name (the order they start in)."""
    return {
        "mlflow": [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(deployment.mlflow_port),
                   "--workers", "2", "--backend-store-uri", deployment.database_url("mlflow"),
                   "--artifacts-destination", deployment.mlflow_artifacts],
        **dask_commands(deployment),
        **{name: [str(BIN / "airflow"), name] for name in AIRFLOW_PROCESSES},
        **({"celery-worker": [str(BIN / "airflow"), "celery", "worker"]} if deployment.executor == "CeleryExecutor"
           else {}),
    }


def _pids_file(deployment: Deployment) -> Path:
    return deployment.state / "pids.json"


def answers(url: str) -> bool:
    """Whether a server answers at `url` (any HTTP status under 500)."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status < 500
    except urllib.error.HTTPError as err:
        return err.code < 500
    except OSError:
        return False


def scheduler_healthy(airflow_url: str) -> bool:
    """Whether Airflow's health endpoint says its scheduler heartbeats: once it has started its loop (its executor
    preloads the stage libraries first: 10-40 s, in which no run is scheduled and the scheduler looks dead)."""
    try:
        with urllib.request.urlopen(f"{airflow_url}/api/v2/monitor/health", timeout=3) as response:
            return json.load(response)["scheduler"]["status"] == "healthy"
    except (OSError, ValueError, KeyError):
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait(what: str, ready, processes: dict[str, subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        for name, process in processes.items():
            if process.poll() is not None:
                tail = (logs / f"{name}.log").read_text()[-3000:]
                raise ServiceError(f"{name} exited with code {process.returncode} while waiting for {what}; "
                                   f"log {logs / (name + '.log')}:\n{tail}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} did not answer within {START_TIMEOUT_S}s; logs in {logs}")
        time.sleep(1)


def up(deployment: Deployment) -> dict[str, str]:
    """Start every service (none may be running already); return the URLs and the login."""
    if running(deployment):
        raise ServiceError(f"services are already up (see {_pids_file(deployment)}); `make down` first")
    ports = (deployment.airflow_port, deployment.mlflow_port, deployment.dask_port, deployment.dashboard_port)
    busy = [p for p in ports if _port_open(p)]
    if busy:
        raise ServiceError(f"port(s) {busy} on 127.0.0.1 are taken; set LEPTON_AIRFLOW_PORT, LEPTON_MLFLOW_PORT, "
                           "LEPTON_DASK_PORT or LEPTON_DASK_DASHBOARD_PORT")
    ensure_databases(deployment)
    env = service_env(deployment)
    logs = deployment.state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    migrate = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True)
    if migrate.returncode != 0:
        raise ServiceError(f"airflow db migrate failed:\n{migrate.stdout[-2000:]}\n{migrate.stderr[-2000:]}")
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands(deployment).items():
            processes[name] = subprocess.Popen(command, env=env, cwd=deployment.state, start_new_session=True,
                                               stdout=(logs / f"{name}.log").open("ab"), stderr=subprocess.STDOUT)
            _pids_file(deployment).write_text(json.dumps({n: p.pid for n, p in processes.items()}))
        _wait("MLflow", lambda: answers(f"{deployment.mlflow_url}/health"), processes, logs)
        _wait("the Dask scheduler", lambda: _port_open(deployment.dask_port), processes, logs)
        _wait("the Airflow api-server", lambda: answers(f"{deployment.airflow_url}/api/v2/monitor/health"),
              processes, logs)
        _wait("the Airflow scheduler's first heartbeat", lambda: scheduler_healthy(deployment.airflow_url),
              processes, logs)
    except BaseException:
        down(deployment)
        raise
    keys = login(deployment)
    script = deployment.state / "env.sh"  # holds the keys: private
    script.write_text(env_script(env))
    script.chmod(0o600)
    return {"airflow": deployment.airflow_url, "mlflow": deployment.mlflow_url,
            "dask_dashboard": deployment.dashboard_url,
            "dask_scheduler": deployment.dask_address, "username": keys["username"],
            "password_file": str(deployment.state / "login.json"), "logs": str(logs), "env": str(script)}


def running(deployment: Deployment) -> dict[str, int]:
    """The services whose processes are still alive, by name."""
    path = _pids_file(deployment)
    if not path.exists():
        return {}
    alive = {}
    for name, pid in json.loads(path.read_text()).items():
        try:
            os.kill(pid, 0)
            alive[name] = pid
        except ProcessLookupError:
            pass
    return alive


def down(deployment: Deployment, timeout: float = 30) -> list[str]:
    """Stop every service (its whole process group), Airflow first; return the names stopped."""
    alive = running(deployment)
    for name in sorted(alive, key=lambda n: n.startswith(BACKING_PREFIXES)):
        try:
            os.killpg(alive[name], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while running(deployment) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in running(deployment).values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _pids_file(deployment).unlink(missing_ok=True)
    return sorted(alive)


def env_script(env: dict[str, str]) -> str:
    """`export` lines (from `service_env`) that point a shell's `airflow` commands at the running deployment."""
    names = [k for k in env if k.startswith(("AIRFLOW", "LEPTON_"))]
    return "\n".join(f"export {k}={shlex.quote(env[k])}" for k in names) + "\n"
