"""The Airflow connections Lepton reads: `mlflow_default` (the tracking store and its login) and `dask_default`
(an external Dask scheduler). Looked up here only, when a task runs; outside Airflow, or where a connection is
not defined, each falls back to the environment or the local default."""

from __future__ import annotations

import json

from lepton_tasks.config.settings import Settings

MLFLOW_CONN_ID = "mlflow_default"
DASK_CONN_ID = "dask_default"


def airflow_connection(conn_id: str):
    """The Airflow connection `conn_id`, or None outside Airflow or where it is not defined."""
    try:
        from airflow.sdk import Connection

        return Connection.get(conn_id)
    except Exception:  # not running under Airflow, or no such connection: the caller falls back
        return None


def dask_connection_env(host: str, port: int) -> dict[str, str]:
    """The environment variable that defines `dask_default` as the scheduler at host:port (what `lepton up` hands
    Airflow's components, as an operator would for an external cluster)."""
    return {f"AIRFLOW_CONN_{DASK_CONN_ID.upper()}": json.dumps({"conn_type": "generic", "host": host, "port": port})}


def mlflow_tracking_uri(settings: Settings) -> str:
    """Connection `mlflow_default`, else MLFLOW_TRACKING_URI, else a local SQLite store.

    The connection is a tracking server (type http/https: host, port; login and password become MLflow's basic
    auth, see `mlflow_auth_env`), a database store (type postgres/mysql: host, port, schema = database, login,
    password), or any URI in its extra `tracking_uri`.
    """
    conn = airflow_connection(MLFLOW_CONN_ID)
    uri = _connection_tracking_uri(conn) if conn is not None else None
    return uri or settings.mlflow_tracking_uri or settings.local_mlflow_uri()


DB_SCHEMES = {"postgres": ("postgresql", 5432), "postgresql": ("postgresql", 5432), "mysql": ("mysql", 3306)}


def _connection_tracking_uri(conn) -> str | None:
    from urllib.parse import quote

    extra = conn.extra_dejson or {}
    if extra.get("tracking_uri"):
        return extra["tracking_uri"]
    if not conn.host:
        return None
    if "://" in conn.host:
        return conn.host
    if conn.conn_type in DB_SCHEMES:
        scheme, port = DB_SCHEMES[conn.conn_type]
        auth = ""
        if conn.login:
            auth = quote(conn.login, safe="") + (f":{quote(conn.password, safe='')}" if conn.password else "") + "@"
        return f"{scheme}://{auth}{conn.host}:{conn.port or port}/{conn.schema or 'mlflow'}"
    scheme = "https" if conn.conn_type == "https" else "http"
    return f"{scheme}://{conn.host}" + (f":{conn.port}" if conn.port else "")


def mlflow_auth_env() -> dict[str, str]:
    """MLflow's basic-auth variables from an http(s) connection `mlflow_default` with a login (else none)."""
    conn = airflow_connection(MLFLOW_CONN_ID)
    if conn is None or not conn.login or conn.conn_type in DB_SCHEMES:
        return {}
    return {"MLFLOW_TRACKING_USERNAME": conn.login, "MLFLOW_TRACKING_PASSWORD": conn.password or ""}
