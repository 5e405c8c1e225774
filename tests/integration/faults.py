"""Fault injection for whole runs: real SIGKILLs of real Dask processes at chosen moments of a DAG run.

Two ways to pick the moment:
- `KillOnce`, a Dask worker plugin: the worker SIGKILLs itself when it starts (or is some time into) a task whose
  key names a stage function; exact, for moments too short to catch from outside (writing a shard partition).
  It is imported by the workers, so they need this repository on PYTHONPATH.
- `FaultDriver`, a thread that waits for what an operator could see (a task running, a checkpoint on disk) and
  then kills a process.
Either way a record proves what each fault hit: `KillOnce` runs inside the Dask worker it kills and writes that
worker's pid and address; `LeftLog`, a scheduler plugin, writes each worker the scheduler saw leave; the kills
from outside name the processes they killed and check them against the workers the scheduler knew.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin


class KillOnce(WorkerPlugin):
    """SIGKILL this worker `delay_s` after it starts executing the first task whose key contains `key_part`; once
    per cluster (the marker file is created exclusively). The marker holds the worker's pid, address and the key."""

    def __init__(self, key_part: str, marker: str, delay_s: float = 0.0):
        self.key_part, self.marker, self.delay_s = key_part, marker, delay_s
        self.name = f"lepton-test-kill-{key_part}"
        self.address = ""

    def setup(self, worker):
        self.address = worker.address

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or self.key_part not in str(key):
            return
        try:
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {self.address} {key}\n".encode())
        os.close(fd)
        threading.Timer(self.delay_s, os.kill, (os.getpid(), signal.SIGKILL)).start()


class LeftLog(SchedulerPlugin):
    """Appends the address of every worker the scheduler removes (a lost connection included) to `path`."""

    name = "lepton-test-left-log"

    def __init__(self, path: str):
        self.path = path

    def remove_worker(self, scheduler, worker, *, stimulus_id, **kwargs):
        with open(self.path, "a") as out:
            out.write(f"{worker}\n")


def watch(scheduler_address: str, left_log: Path, kills: list[KillOnce]) -> str:
    """Register `LeftLog` on the scheduler and `kills` on its workers (which import this module: the repository
    must be on their PYTHONPATH)."""
    from distributed import Client

    with Client(scheduler_address, timeout="60s") as client:
        client.register_plugin(LeftLog(str(left_log)))
        for kill in kills:
            client.register_plugin(kill)
        return f"watching {scheduler_address}: {len(client.scheduler_info()['workers'])} workers"


def killed_worker(marker: Path) -> tuple[int, str, str]:
    """(pid, address, task key) that a `KillOnce` marker holds."""
    pid, address, key = Path(marker).read_text().split()
    return int(pid), address, key


def left(left_log: Path) -> set[str]:
    """The worker addresses the scheduler saw leave (`LeftLog`)."""
    return set(Path(left_log).read_text().split()) if Path(left_log).exists() else set()


def known_workers(scheduler_address: str) -> dict[str, int]:
    """Address -> pid of every worker the scheduler knows now."""
    from distributed import Client

    with Client(scheduler_address, timeout="30s") as client:
        return client.run(os.getpid)  # each worker answers with its own pid


@dataclass
class FaultDriver:
    """Runs each (name, ready, act) step once `ready()` holds, in order, on a background thread."""

    steps: list[tuple[str, Callable[[], bool], Callable[[], str]]]
    done: dict[str, str] = field(default_factory=dict)  # step name -> what `act` reported, for steps that acted
    retried: dict[str, list[str]] = field(default_factory=dict)  # step name -> the errors it was tried again after
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
                    self.retried.setdefault(name, []).append(repr(err))
                time.sleep(0.1)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and its descendants (a `dask worker` nanny with its worker); the pids killed."""
    import psutil

    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        process.kill()
    return [p.pid for p in tree]


def kill_dask_worker_process(pid: int, scheduler_address: str) -> str:
    """SIGKILL a `dask worker` process tree (nanny and worker); the addresses of the workers the scheduler knew
    in it. Fails, killing nothing, when the tree holds no worker the scheduler knows."""
    import psutil

    tree = {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
    hit = [address for address, worker_pid in known_workers(scheduler_address).items() if worker_pid in tree]
    if not hit:
        raise AssertionError(f"process tree {sorted(tree)} holds no worker the scheduler knows")
    kill_tree(pid)
    return " ".join(hit)


def first_difference(run_a: Path, run_b: Path) -> str | None:
    """The first output (shard data, then each round's checkpoints, then the merged model) whose content differs
    between two runs of the same params, or None: the determinism policy says there is none."""
    from lepton_tasks.core.storage import sha256_file
    from lepton_tasks.ml.models import load_checkpoint

    for part in sorted((run_a / "shard").rglob("*.parquet")):
        if sha256_file(part) != sha256_file(run_b / part.relative_to(run_a)):
            return str(part.relative_to(run_a))
    checkpoints = sorted((run_a / "train").rglob("*.safetensors")) + [run_a / "merge/merged.safetensors"]
    for path in checkpoints:
        (mine, _), (theirs, _) = load_checkpoint(path), load_checkpoint(run_b / path.relative_to(run_a))
        if any(not mine[k].equal(theirs[k]) for k in mine):
            return str(path.relative_to(run_a))
    return None


def supervised_child(supervisor_pid: int) -> int:
    """The pid of the process a `lepton_tasks.tools.supervisor` runs now."""
    import psutil

    return psutil.Process(supervisor_pid).children()[0].pid


def cluster_processes(data_root: Path) -> list[int]:
    """Every live process of the local Dask clusters that tasks working on `data_root` hold (`python -m
    lepton_tasks.infra.cluster`, its workers and multiprocessing's resource tracker): what must be gone once a run
    has ended. Other tests' clusters, running beside this one in the suite, are not this run's."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            ours = process.environ().get("LEPTON_DATA_ROOT") == str(data_root)
        except psutil.Error:  # gone meanwhile
            continue
        if ours and "lepton_tasks.infra.cluster" in " ".join(process.info["cmdline"] or []):
            found += [process.pid, *(c.pid for c in process.children(recursive=True) if c.is_running())]
    return found
