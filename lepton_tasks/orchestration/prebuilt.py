"""DAGs built once in the scheduler, before it forks, and reused by the task processes forked from it.

Airflow parses a task's DAG file again in every task process. For a pipeline DAG that parse is mostly Airflow
building it: each of its operators deep-copies the DAG's 27 form params once per class in its hierarchy (about
50 copies a DAG), and the DAG validates each param's JSON schema; 60-70 ms a task on two cores, on the critical
path of every run. `PreloadingLocalExecutor` already imports the stage libraries before it forks its workers;
`prebuild` does the same for the pipeline DAGs: it executes the DAG file once in the scheduler, and `build_once`
hands each task process the DAG built there instead of building it again.

Reuse is exact, not a cache that can go stale: a prebuilt DAG is reused only where the DAG file's bytes, the spec
file's path and its bytes are the same as when it was built. The code it calls is the same too, as the task
processes inherit the scheduler's imported modules whether or not anything was prebuilt (so an upgrade of
`lepton_tasks` needs a scheduler restart either way), and so is the environment. Any other process (the
dag-processor, `airflow dags test`, a test) builds every DAG as usual: only `prebuild` stores one. Each task
process is a fork, so whatever Airflow sets on the DAG while it runs the task stays in that process.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from lepton_tasks.core.storage import sha256_file
from lepton_tasks.orchestration.airflow_internals import clear_autoregistered_dags

if TYPE_CHECKING:
    from lepton_tasks.config.specs import LoadedSpec

log = logging.getLogger(__name__)

DAG = TypeVar("DAG")
Key = tuple[str, str, str]  # (DAG file sha256, spec path, spec sha256)

_prebuilt: dict[Key, object] = {}
_storing = False  # true only while `prebuild` executes the DAG files


def build_once(loaded: LoadedSpec, build: Callable[[LoadedSpec], DAG], dag_file: str) -> DAG:
    """The DAG `build(loaded)` returns: the one `prebuild` built from the same DAG file and spec where there is
    one, else a new one. A process with nothing prebuilt (the dag-processor, a test) does not even hash the file."""
    if not (_prebuilt or _storing):
        return build(loaded)
    key = (sha256_file(Path(dag_file)), str(loaded.path), loaded.sha256)
    if key in _prebuilt:
        return _prebuilt[key]
    dag = build(loaded)
    if _storing:
        _prebuilt[key] = dag
    return dag


def prebuild(dag_files: list[Path]) -> list[str]:
    """Execute each DAG file once, keeping the DAGs its `build_once` calls build; their dag_ids. A file that fails
    is logged and skipped: its tasks then build their DAGs as usual."""
    global _storing
    before = set(_prebuilt)
    for path in dag_files:
        name = f"lepton_prebuilt_{path.stem}"
        _storing = True
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as err:  # the dag-processor reports a broken DAG file; the scheduler must still start
            log.warning("could not prebuild the DAGs of %s (%s); its tasks will build them", path, err)
        finally:
            _storing = False
            sys.modules.pop(name, None)
            clear_autoregistered_dags()  # this process parses no DAG file: nothing to register
    return sorted(dag.dag_id for key, dag in _prebuilt.items() if key not in before)
