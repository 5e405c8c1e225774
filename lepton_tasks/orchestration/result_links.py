"""Where a run's results can be seen: MLflow run and model version, GE data docs, drift report, Dask dashboard.

Plain functions over the stages' manifests; `plugins/lepton_plugin.py` turns them into task-instance extra links
in the Airflow UI, and serves each run's data docs (which live in the run folder) behind Airflow's login.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from lepton_tasks.core import store
from lepton_tasks.core.storage import RunPaths

DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` / `mlflow server` listen by default
DATA_DOCS_PREFIX = "/lepton/data-docs"  # mounted by the plugin on the Airflow api-server
DRIFT_PREFIX = "/lepton/drift"


def mlflow_ui_base(tracking_uri: str | None) -> str:
    """The MLflow UI for a tracking URI: LEPTON_MLFLOW_UI_URL, else the tracking server itself (without user
    info), else the default `mlflow ui` address (a database or local store has no UI of its own)."""
    explicit = os.environ.get("LEPTON_MLFLOW_UI_URL")
    if explicit:
        return explicit.rstrip("/")
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
    return DEFAULT_MLFLOW_UI


def mlflow_run_url(registered: dict) -> str:
    base = mlflow_ui_base(registered.get("tracking_uri"))
    return f"{base}/#/experiments/{registered['experiment_id']}/runs/{registered['run_id']}"


def model_version_url(registered: dict) -> str:
    base = mlflow_ui_base(registered.get("tracking_uri"))
    return f"{base}/#/models/{quote(registered['model_name'], safe='')}/versions/{registered['model_version']}"


def data_docs_url(dag_id: str, run_id: str) -> str:
    """The run's data docs as served by the plugin (same origin as the Airflow UI, so its login applies)."""
    return f"{DATA_DOCS_PREFIX}/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/index.html"


def data_docs_file(data_root: Path, dag_id: str, run_id: str, relative: str) -> Path | None:
    """The data-docs file `relative` of a run, or None when it does not exist or would leave the docs folder."""
    from lepton_tasks.stages.validate import DOCS_DIR

    docs = (RunPaths.of(data_root, dag_id, run_id).stage("validate") / DOCS_DIR).resolve()
    wanted = (docs / (relative or "index.html")).resolve()
    if not wanted.is_relative_to(docs) or not store.fetch(wanted):  # on a store working area, fetched from there
        return None
    return wanted


def drift_report_url(dag_id: str, run_id: str) -> str:
    """The run's drift report as served by the plugin (beside the data docs, under Airflow's login)."""
    return f"{DRIFT_PREFIX}/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/report.html"


def drift_report_file(data_root: Path, dag_id: str, run_id: str) -> Path | None:
    from lepton_tasks.stages.drift import REPORT

    found = RunPaths.of(data_root, dag_id, run_id).stage("drift") / REPORT
    return found if store.fetch(found) else None


def dask_dashboard_url(trained: dict | None) -> str | None:
    """LEPTON_DASK_DASHBOARD_URL, else the dashboard of the cluster that trained this run (a per-task local
    cluster's dashboard lives only while its task runs)."""
    return os.environ.get("LEPTON_DASK_DASHBOARD_URL") or (trained or {}).get("dashboard_link")
