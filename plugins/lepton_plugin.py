"""Lepton in the Airflow UI: extra links on every task of a Lepton run, and the run's GE data docs.

The links (MLflow run, MLflow model version, data docs, drift report, Dask dashboard) are computed by the
api-server from the manifests the run's tasks returned through XCom; a link stays greyed out until the task
that knows it has run. The data docs and the drift report live in the run folder and are served here, under
Airflow's own login. Its listener tells `PreloadingLocalExecutor`'s scheduler when a task process ends.
"""

from __future__ import annotations

import mimetypes

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse

from lepton_tasks.config.settings import Settings
from lepton_tasks.orchestration import result_links as links
from lepton_tasks.orchestration.executor import TaskEndListener

LEPTON_TAG = "lepton"


def _manifest(ti_key, task_id: str) -> dict | None:
    """What task `task_id` of the same DAG run returned, or None before it succeeded."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(key="return_value", run_id=ti_key.run_id, dag_ids=ti_key.dag_id, task_ids=task_id)
            .with_only_columns(XComModel.value)
        ).first()
    value = XComModel.deserialize_value(row) if row else None
    return value if isinstance(value, dict) else None


def _is_lepton(operator) -> bool:
    dag = getattr(operator, "dag", None)
    return dag is not None and LEPTON_TAG in (dag.tags or ())


class MlflowRunLink(BaseOperatorLink):
    name = "MLflow run"

    def get_link(self, operator, *, ti_key) -> str:
        registered = _is_lepton(operator) and _manifest(ti_key, "register")
        return links.mlflow_run_url(registered) if registered else ""


class ModelVersionLink(BaseOperatorLink):
    name = "MLflow model version"

    def get_link(self, operator, *, ti_key) -> str:
        registered = _is_lepton(operator) and _manifest(ti_key, "register")
        return links.model_version_url(registered) if registered else ""


class DataDocsLink(BaseOperatorLink):
    name = "Data docs"

    def get_link(self, operator, *, ti_key) -> str:
        if not _is_lepton(operator):
            return ""
        exists = links.data_docs_file(Settings.from_env().data_root, ti_key.dag_id, ti_key.run_id, "index.html")
        return links.data_docs_url(ti_key.dag_id, ti_key.run_id) if exists else ""


class DriftReportLink(BaseOperatorLink):
    name = "Drift report"

    def get_link(self, operator, *, ti_key) -> str:
        if not _is_lepton(operator):
            return ""
        exists = links.drift_report_file(Settings.from_env().data_root, ti_key.dag_id, ti_key.run_id)
        return links.drift_report_url(ti_key.dag_id, ti_key.run_id) if exists else ""


class DaskDashboardLink(BaseOperatorLink):
    name = "Dask dashboard"

    def get_link(self, operator, *, ti_key) -> str:
        if not _is_lepton(operator):
            return ""
        return links.dask_dashboard_url(_manifest(ti_key, "train")) or ""


def _data_docs_app() -> FastAPI:
    from airflow.api_fastapi.core_api.security import get_user

    app = FastAPI(title="Lepton data docs", dependencies=[Depends(get_user)])  # Airflow's login, cookie or token

    @app.get("/data-docs/{dag_id}/{run_id}/{relative:path}")
    def data_docs(dag_id: str, run_id: str, relative: str) -> FileResponse:
        found = links.data_docs_file(Settings.from_env().data_root, dag_id, run_id, relative)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no data docs '{relative}' for {dag_id} run {run_id}")
        return FileResponse(found, media_type=mimetypes.guess_type(found.name)[0] or "application/octet-stream")

    @app.get("/drift/{dag_id}/{run_id}/report.html")
    def drift_report(dag_id: str, run_id: str) -> FileResponse:
        found = links.drift_report_file(Settings.from_env().data_root, dag_id, run_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no drift report for {dag_id} run {run_id}")
        return FileResponse(found, media_type="text/html")

    return app


class LeptonPlugin(AirflowPlugin):
    name = "lepton"
    global_operator_extra_links = [MlflowRunLink(), ModelVersionLink(), DataDocsLink(), DriftReportLink(),
                                   DaskDashboardLink()]
    listeners = [TaskEndListener()]  # wakes PreloadingLocalExecutor's scheduler as a task ends (see its docstring)
    fastapi_apps = [{"app": _data_docs_app(), "url_prefix": links.DATA_DOCS_PREFIX.rsplit("/", 1)[0],
                     "name": "Lepton data docs"}]
