"""The preloading LocalExecutor's import list, its tolerance of a module that does not import, and its idle
heartbeat, which ends when a task does, told by the task process itself or by its worker
(`tests/integration/test_scheduler.py` runs whole DAG runs under it)."""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time

import pytest
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.state import TaskInstanceState

from lepton_tasks.orchestration import prebuilt
from lepton_tasks.orchestration.executor import (
    STAGE_LIBRARIES,
    PreloadingLocalExecutor,
    TaskEndListener,
    preload,
    preload_modules,
)


def test_the_list_is_the_stage_libraries_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("LEPTON_PRELOAD_MODULES", raising=False)
    assert preload_modules() == STAGE_LIBRARIES and "torch" in STAGE_LIBRARIES
    monkeypatch.setenv("LEPTON_PRELOAD_MODULES", " torch, ,mlflow ")
    assert preload_modules() == ("torch", "mlflow")
    monkeypatch.setenv("LEPTON_PRELOAD_MODULES", "")
    assert preload_modules() == ()


def test_a_module_that_does_not_import_is_skipped_and_logged(caplog):
    seconds = preload(("colorsys", "lepton_no_such_module"))
    assert list(seconds) == ["colorsys"] and "colorsys" in sys.modules
    assert "could not preload lepton_no_such_module" in caplog.text


@pytest.fixture
def executor(monkeypatch):
    """A started PreloadingLocalExecutor (real LocalExecutor worker processes), preloading nothing."""
    monkeypatch.setenv("LEPTON_PRELOAD_MODULES", "")
    monkeypatch.setattr(prebuilt, "_prebuilt", {})  # what it prebuilds stays with this test
    started = PreloadingLocalExecutor(parallelism=1)
    started.start()
    yield started
    started.end()


def _a_task_result(executor, after_s: float) -> TaskInstanceKey:
    """What a LocalExecutor worker puts on the result queue when its task process ends, `after_s` from now."""
    key = TaskInstanceKey("lepton_dag", "some_task", "run-1", try_number=1)
    threading.Timer(after_s, executor.result_queue.put, [(key, TaskInstanceState.SUCCESS, None)]).start()
    return key


def test_an_idle_heartbeat_returns_as_soon_as_a_task_ends_and_hands_its_result_to_the_scheduler(executor):
    executor.idle_wait_s = 120  # far longer than the test: only the task's result can end the wait
    key = _a_task_result(executor, after_s=0.2)
    started = time.monotonic()
    executor.heartbeat()  # sent no work: waits for the result
    assert time.monotonic() - started < 60
    assert executor.get_event_buffer()[key][0] == TaskInstanceState.SUCCESS


def test_an_idle_heartbeat_with_no_task_ending_waits_as_long_as_the_scheduler_used_to_sleep(executor):
    executor.idle_wait_s = 0.3
    started = time.monotonic()
    executor.heartbeat()
    assert time.monotonic() - started >= 0.3 and not executor.get_event_buffer()


def _a_task_process_ends(after_s: float) -> None:
    """A process forked from the scheduler, as task processes are, whose task ends `after_s` from now."""
    time.sleep(after_s)
    TaskEndListener().on_task_instance_success(previous_state=None, task_instance=None)


def test_an_idle_heartbeat_returns_as_soon_as_a_task_process_says_it_ended_before_its_worker_does(executor):
    executor.idle_wait_s = 120
    task_process = multiprocessing.get_context("fork").Process(target=_a_task_process_ends, args=(0.2,))
    task_process.start()
    started = time.monotonic()
    executor.heartbeat()  # no result from a worker comes: the task process's word alone ends the wait
    assert time.monotonic() - started < 60
    task_process.join()
    assert not executor.get_event_buffer()  # the task's state is the worker's to report, later
    started = time.monotonic()
    executor.idle_wait_s = 0.3
    executor.heartbeat()  # what the task process wrote was read: the next idle heartbeat waits again
    assert time.monotonic() - started >= 0.3


def test_telling_never_blocks_nor_fails_a_task_process(monkeypatch):
    import os

    from lepton_tasks.orchestration import executor as module

    monkeypatch.setattr(module, "_task_end_pipe", None)  # run by another executor, or by `airflow dags test`
    assert TaskEndListener().on_task_instance_failed(previous_state=None, task_instance=None, error=None) is None
    monkeypatch.setattr(module, "_task_end_pipe", None)
    read_end = module._open_task_end_pipe()
    started = time.monotonic()
    for _ in range(100_000):  # more than the pipe holds, as when the scheduler has stopped reading
        TaskEndListener().on_task_instance_success(previous_state=None, task_instance=None)
    assert time.monotonic() - started < 30
    held = len(os.read(read_end, 1 << 20))
    assert 0 < held < 100_000
    module._drain(read_end)
    for end in module._task_end_pipe:
        os.close(end)
