"""Every use of Airflow's private API in Lepton, in one place.

The preloading executor (`executor.py`) and the prebuilt DAGs (`prebuilt.py`) keep a run's tasks fast by reaching
into three things Airflow does not promise to keep:
- `LocalExecutor._process_workloads`, the method that hands queued workloads to the executor's workers
  (`WorkSentHook` hears of each batch);
- the read end of LocalExecutor's result queue, a `multiprocessing.SimpleQueue`'s `_reader`
  (`result_queue_reader`), which the idle heartbeat waits on;
- `airflow.sdk.definitions._internal.contextmanager.DagContext.autoregistered_dags`, which a DAG file executed
  outside the dag-processor fills and `clear_autoregistered_dags` empties.

`problems()` checks each against the installed Airflow; `tests/test_airflow_internals.py` fails, naming the one
that changed, after an Airflow upgrade that breaks it. The fallback is Airflow's own executor: set `[core]
executor = LocalExecutor` and `[scheduler] scheduler_idle_sleep_time = 1` in airflow.cfg. Runs then work as
before, only slower: every task imports the stage libraries and builds its DAG itself, and the next task of a
run waits out the scheduler's idle sleep.
"""

from __future__ import annotations

import inspect
from typing import Any


class WorkSentHook:
    """Mix in before `LocalExecutor`: `on_work_sent(workloads)` is called after each batch LocalExecutor's
    `_process_workloads` hands to its workers."""

    def _process_workloads(self, workload_list) -> None:
        super()._process_workloads(workload_list)  # type: ignore[misc]
        self.on_work_sent(workload_list)

    def on_work_sent(self, workload_list) -> None:
        raise NotImplementedError


def result_queue_reader(executor) -> Any:
    """The connection a started LocalExecutor's worker results arrive on (for `multiprocessing.connection.wait`)."""
    return executor.result_queue._reader


def clear_autoregistered_dags() -> None:
    """Forget the DAGs that executing a DAG file registered for a dag-processor parse (this process parses none)."""
    from airflow.sdk.definitions._internal.contextmanager import DagContext

    DagContext.autoregistered_dags.clear()


def problems() -> list[str]:
    """What of the above the installed Airflow no longer has, one line each; empty when all is there."""
    import multiprocessing

    from airflow.executors.local_executor import LocalExecutor

    found = []
    method = getattr(LocalExecutor, "_process_workloads", None)
    if method is None or list(inspect.signature(method).parameters) != ["self", "workload_list"]:
        found.append("LocalExecutor._process_workloads(self, workload_list) is gone or takes other arguments")
    if "result_queue" not in inspect.getsource(LocalExecutor.start):
        found.append("LocalExecutor.start no longer makes a `result_queue`")
    if not hasattr(multiprocessing.SimpleQueue(), "_reader"):
        found.append("multiprocessing.SimpleQueue has no `_reader`")
    try:
        from airflow.sdk.definitions._internal.contextmanager import DagContext

        if not isinstance(getattr(DagContext, "autoregistered_dags", None), set | dict):
            found.append("DagContext.autoregistered_dags is gone")
    except ImportError as err:
        found.append(f"airflow.sdk.definitions._internal.contextmanager.DagContext: {err}")
    return found
