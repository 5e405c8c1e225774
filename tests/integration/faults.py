"""Fault injection for whole runs: real SIGKILLs of real Dask processes at chosen moments of a DAG run.

Two ways to pick the moment:
- `KillOnce`, a Dask worker plugin: the worker SIGKILLs itself when it starts (or is some time into) a task whose
  key names a stage function; exact, for moments too short to catch from outside (writing a shard partition).
  It is imported by the workers, so they need this repository on PYTHONPATH.
- `FaultDriver`, a thread that waits for what an operator could see (a task running, a checkpoint on disk) and
  then kills a process.
Either way a marker file records each fault, so a test can prove it really happened.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin


class KillOnce(WorkerPlugin):
    """SIGKILL this worker `delay_s` after it starts executing the first task whose key contains `key_part`; once
    per cluster (the marker file is created exclusively)."""

    def __init__(self, key_part: str, marker: str, delay_s: float = 0.0):
        self.key_part, self.marker, self.delay_s = key_part, marker, delay_s
        self.name = f"lepton-test-kill-{key_part}"

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or self.key_part not in str(key):
            return
        try:
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {key}\n".encode())
        os.close(fd)
        threading.Timer(self.delay_s, os.kill, (os.getpid(), signal.SIGKILL)).start()


@dataclass
class FaultDriver:
    """Runs each (name, ready, act) step once `ready()` holds, in order, on a background thread."""

    steps: list[tuple[str, Callable[[], bool], Callable[[], str]]]
    done: dict[str, str] = field(default_factory=dict)  # step name -> what `act` reported
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> FaultDriver:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        for name, ready, act in self.steps:
            while not self._stop.is_set():
                try:
                    if ready():
                        self.done[name] = act()
                        break
                except Exception as err:  # a process that vanished between look and kill: look again
                    self.done.setdefault(f"{name} (retried)", repr(err))
                time.sleep(0.1)


def kill_tree(pid: int) -> str:
    """SIGKILL a process and its descendants (a `dask worker` nanny with its worker); what was killed."""
    import psutil

    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        process.kill()
    return " ".join(str(p.pid) for p in tree)


def supervised_child(supervisor_pid: int) -> int:
    """The pid of the process a `lepton_tasks.supervisor` runs now."""
    import psutil

    return psutil.Process(supervisor_pid).children()[0].pid


def local_cluster_workers() -> list[int]:
    """Worker processes of the local Dask clusters Lepton's tasks hold (`python -m lepton_tasks.cluster`)."""
    import psutil

    workers = []
    for process in psutil.process_iter(["cmdline"]):
        if "lepton_tasks.cluster" in " ".join(process.info["cmdline"] or []):
            workers += [child.pid for child in process.children() if child.is_running()]
    return workers


def marker_written(path: Path) -> bool:
    return Path(path).exists() and bool(Path(path).read_text().strip())
