"""The Celery app's configuration (`[celery] celery_config_options` in airflow.cfg points here): Airflow's own,
and a Celery worker that starts its task processes as the PreloadingLocalExecutor does.

`airflow celery worker` forks its pool from its main process, and Airflow's supervisor forks each task process
from a pool process; so the stage libraries imported and the pipeline DAGs built once in the main process
(Celery's `worker_init` signal, before the pool starts) are there in every task, instead of each task importing
torch, GX and MLflow again (seconds of CPU per task). Importing this module preloads nothing: the scheduler, which
builds the same app to send tasks, imports it too.
"""

from __future__ import annotations

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import worker_init

CELERY_CONFIG = dict(DEFAULT_CELERY_CONFIG)


@worker_init.connect
def _preload(**_) -> None:
    from airflow.configuration import conf

    from lepton_tasks.orchestration.executor import prepare_task_processes

    if conf.get("celery", "pool", fallback="prefork") == "prefork":  # threads or solo: nothing is forked
        prepare_task_processes()
