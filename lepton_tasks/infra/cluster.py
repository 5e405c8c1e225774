"""Dask cluster lifecycle: an external scheduler, or a local cluster in its own process.

Order of choice (`dask_client`):
1. an external scheduler (`tcp://...`): the Airflow connection `dask_default`, or `LEPTON_DASK_ADDRESS`;
2. the run's own cluster (`start_run_cluster`, the DAG's setup task; `stop_run_cluster` is its teardown): started
   once a run and shared by partitioned validation, shard and train, so a run pays the start-up once, not once a
   task. If it is gone (killed), the task starts one of its own, as in 3 and 4, and says so;
3. `dask_cuda.LocalCUDACluster` (one worker per GPU) when torch itself can use a CUDA device;
4. `distributed.LocalCluster` otherwise, one worker per shard up to the cores; the fallback is logged.

Faults (`recovering`): a lost worker is Dask's to handle (it reschedules, or recomputes a lost result, which the
stages make cheap by reading back what was already written). A lost scheduler cancels every future; the stage
body is then run again once the client has reconnected and a worker has joined, and a cluster that does not
come back within LEPTON_DASK_RECOVERY_S becomes a retryable ClusterError for Airflow's retry.

Why a helper process: under Airflow's scheduler a task process is started from the `airflow` entry point, and
Dask's default `spawn` start method re-imports that entry point in every new worker, which then crashes on its
missing metadata-DB settings. The local cluster is therefore built in `python -m lepton_tasks.infra.cluster`, whose
main module does no I/O on import, and the task connects to it through a scheduler file.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from lepton_tasks.config.settings import Settings
from lepton_tasks.core.errors import ClusterError
from lepton_tasks.core.storage import read_json, write_json
from lepton_tasks.infra.connections import DASK_CONN_ID, airflow_connection

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 10  # the run's cluster is on this machine: it answers at once or it is gone
RUN_CLUSTER_IDLE_S = 1800  # a run's cluster with no client and no task this long stops itself (a lost teardown)
RUN_CLUSTER_WAIT_S = 120  # how long a task beside the setup task waits for the run's cluster to answer
T = TypeVar("T")

# Dask settings for every Lepton cluster (the run's local cluster, `make up`, `lepton dask-scheduler` and
# `lepton dask-worker`). For training speed and an idle cluster's cost (bench/stages.py's train benchmark measures
# them):
# - Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker; any explicit value turns off glibc's adaptive
#   mmap threshold and PyTorch then pays an mmap/munmap per activation (several times slower). Lepton's workers run
#   without it; memory still goes back to the OS when the worker exits.
# - the statistical profiler samples every thread's stack every 10 ms under the GIL, which a Python-level
#   training loop of small batches feels; off (the dashboard's profile page stays empty).
# - MKL_CBWR=AUTO,STRICT: MKL's results stop depending on buffer alignment, part of the determinism policy (see
#   `train`); no measurable cost for these models.
# - the event-loop health tick every 1 s, not every 20 ms: it is most of what an idle run cluster's scheduler
#   and nannies spend; a loop blocked for longer than the 3 s limit is still reported.
# - every process's system monitor (CPU, network and disk counters for the dashboard) every 2 s, not 0.5 s; the
#   workers' and nannies' memory checks every 0.5 s, not 0.1 s (a run's tasks are few and long: the spill, pause
#   and restart thresholds are still met, half a second later at most). Together these more than halve what an
#   idle cluster costs, and the run's cluster idles through validate, drift, compress and register.
# - every worker imports torch and the train stage as it starts (`lepton_tasks.orchestration.worker_preload`),
#   not in its first shard: the run's cluster starts beside ingest.
# - a worker host that vanishes without closing its connections (a cut link, a dead VM, a stopped process) is
#   given up within about a minute, not Dask's default five: its heartbeats stop, the scheduler checks every
#   `worker-ttl` for workers silent for longer, tries their nannies for 30 s, then removes them, and their tasks
#   go to the hosts left (a stopped process's kernel still answers TCP, so only the heartbeats can tell). A link
#   that stops answering is closed sooner, after `comm.timeouts.tcp` of unanswered keepalive probes.
LEPTON_DASK_CONFIG = {"distributed": {"nanny": {"pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": None,
                                                                      "MKL_CBWR": "AUTO,STRICT"}},
                                      "worker": {"profile": {"enabled": False},
                                                 "preload": ["lepton_tasks.orchestration.worker_preload"],
                                                 "memory": {"monitor-interval": "500ms"}},
                                      "scheduler": {"worker-ttl": "15s"},
                                      "comm": {"timeouts": {"tcp": "30s"}},
                                      "admin": {"tick": {"interval": "1s"}, "system-monitor": {"interval": "2s"}}}}


def apply_config() -> None:
    """Lepton's Dask settings (LEPTON_DASK_CONFIG) for this whole process: the one that holds a cluster or is one of
    its processes (`serve`, `lepton dask-scheduler`, `lepton dask-worker`)."""
    import dask

    dask.config.update(dask.config.config, LEPTON_DASK_CONFIG, priority="new")


def worker_config():
    """Lepton's Dask settings (LEPTON_DASK_CONFIG) for the clusters made inside the block: a `dask.config.set`
    context, for a cluster started in this process (tests, benchmarks)."""
    import dask

    return dask.config.set(_dotted(LEPTON_DASK_CONFIG))


def _dotted(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} as {"a.b": 1}: dask.config.set replaces nested dicts whole."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver (Linux's proc entry or device nodes, WSL's GPU device): without
    one no torch build can see a CUDA device."""
    return (Path("/proc/driver/nvidia/version").exists() or Path("/dev/dxg").exists()
            or any(Path("/dev").glob("nvidia[0-9]*")))


def gpu_count() -> int:
    """CUDA devices torch itself can use: 0 with a CPU build of torch, without a driver or without a device.
    Without a driver torch is not imported: the cluster helper would pay its import (seconds of CPU) for nothing."""
    if not nvidia_driver_present():
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver or CUDA runtime: no usable GPU
        return 0


def nvml_gpu_count() -> int:
    """GPUs the driver reports through NVML, whether or not torch can use them."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no library, no driver, no device: all mean "no GPU" here
        return 0


def _cpu_workers(wanted: int | None) -> int:
    return max(1, min(wanted or 1, os.cpu_count() or 1))


def external_scheduler_address(settings: Settings) -> str | None:
    """`tcp://host:port` from the Airflow connection `dask_default`, else from the settings."""
    conn = airflow_connection(DASK_CONN_ID)
    if conn is None or not conn.host:
        return settings.dask_address
    if conn.host and "://" in conn.host:
        return conn.host if not conn.port else f"{conn.host}:{conn.port}"
    return f"tcp://{conn.host}:{conn.port or 8786}"


VALIDATION_DONE_ENV = "LEPTON_VALIDATION_DONE"  # set on the nannies once the run's validation is done: no GX preload
VALIDATION_PRELOAD = "lepton_tasks.orchestration.worker_preload_validation"  # GX on the workers (partitioned validate)
EXTERNAL = "external"  # the kind of a run cluster record for the external scheduler: not the run's to stop or restart


def make_local_cluster(n_workers: int | None, threads_per_worker: int, preload: tuple[str, ...] = ()):
    """A `LocalCUDACluster` where GPUs exist, else a `LocalCluster`; returns (cluster, kind). `preload`: modules
    every worker imports as it starts, beside Lepton's own (LEPTON_DASK_CONFIG)."""
    import dask

    gpus = gpu_count()
    extra = {"preload": [*dask.config.get("distributed.worker.preload", []), *preload]} if preload else {}
    if gpus:
        try:
            from dask_cuda import LocalCUDACluster

            return LocalCUDACluster(n_workers=n_workers or gpus, threads_per_worker=threads_per_worker,
                                    dashboard_address=":0", **extra), "LocalCUDACluster"
        except Exception as err:  # an NVML or CUDA error: run on CPU rather than not at all
            log.warning("LocalCUDACluster failed (%s); falling back to a CPU LocalCluster", err)
    elif nvml_gpu_count():
        import torch

        log.warning("the driver reports %d GPU(s) but torch %s cannot use them (a CPU build?): training on the CPU; "
                    "`make setup` on this machine installs the CUDA build", nvml_gpu_count(), torch.__version__)
    else:
        log.info("no GPU usable by torch: using a CPU LocalCluster")
    from distributed import LocalCluster

    return LocalCluster(n_workers=_cpu_workers(n_workers), threads_per_worker=threads_per_worker, processes=True,
                        dashboard_address=":0", **extra), "LocalCluster"


def _default_workers(wanted: int | None, settings: Settings) -> int | None:
    """One worker per shard, capped by the cores (CPU); None lets LocalCUDACluster take one per GPU."""
    if settings.dask_workers:
        return settings.dask_workers
    if gpu_count():
        return None
    return _cpu_workers(wanted)


@contextmanager
def dask_client(settings: Settings, wanted_workers: int | None = None,
                run_cluster: dict | None = None) -> Iterator[object]:
    """A `distributed.Client` on the cluster chosen as described in the module docstring; `run_cluster` is what
    `start_run_cluster` returned for this run."""
    from distributed import Client

    address = external_scheduler_address(settings)
    if address:
        log.info("using the external Dask scheduler at %s", address)
        try:
            client = Client(address, timeout=f"{START_TIMEOUT_S}s")
        except (OSError, TimeoutError) as err:
            raise ClusterError(f"no Dask scheduler answers at {address} (connection '{DASK_CONN_ID}'): {err}") from err
        with client:
            yield client
        return
    client = _run_cluster_client(run_cluster) if run_cluster else None
    if client is not None:
        with client:
            yield client
        return
    with _local_cluster_process(_default_workers(wanted_workers, settings)) as scheduler_file:
        with Client(scheduler_file=str(scheduler_file), timeout=f"{START_TIMEOUT_S}s") as client:
            info = read_json(scheduler_file)
            client.wait_for_workers(info["n_workers"], timeout=START_TIMEOUT_S)
            _log_cluster(info, "for this task")
            yield client


def _started_at(pid: int) -> float:
    """When process `pid` started (with the pid, what tells it from a later process given the same pid): on Linux
    its start in seconds after boot (/proc), which clock adjustments leave alone. psutil's create_time adds the boot
    time, which follows the wall clock (as psutil's documentation warns): a bench run's teardown here read another
    value than its start had, took its own cluster for another process and left it running. Elsewhere, that."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:  # after "pid (command name)": field 22 is the start time
            return int(stat.read().rsplit(b")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        import psutil

        return psutil.Process(pid).create_time()


def _log_cluster(info: dict, whose: str) -> None:
    log.info("%s with %d worker(s) at %s %s (dashboard %s)", info["kind"], info["n_workers"], info["address"], whose,
             info.get("dashboard_link"))


def _run_cluster_client(run_cluster: dict):
    """A client on the run's cluster, or None (logged) when it no longer answers."""
    from distributed import Client

    client = None
    try:
        client = Client(run_cluster["address"], timeout=f"{CONNECT_TIMEOUT_S}s")
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as err:
        if client is not None:
            client.close()
        log.warning("the run's Dask cluster at %s does not answer (%s: %s): starting one for this task",
                    run_cluster["address"], type(err).__name__, err)
        return None
    _log_cluster(run_cluster, "(the run's cluster)")
    return client


def _external_cluster(settings: Settings) -> dict | None:
    """The external scheduler as a run cluster record (nothing to start or stop), or None without one."""
    address = external_scheduler_address(settings)
    return {"address": address, "kind": EXTERNAL, "n_workers": None, "pid": None, "host": None} if address else None


def start_run_cluster(settings: Settings, folder: Path, wanted_workers: int | None, validation: bool = False) -> dict:
    """Start the run's cluster: `python -m lepton_tasks.infra.cluster` in its own session, outliving this task, its
    scheduler file and log in `folder`. Returns what tasks connect with (and `stop_run_cluster` stops): address,
    kind, workers, dashboard, pid, host. With an external scheduler, that scheduler (nothing is started).
    `validation`: the workers import GX as they start (the run's validation will be partitioned on them).
    A retry finds the cluster it started still answering and keeps it."""
    external = _external_cluster(settings)
    if external:
        return external
    scheduler_file = folder / "scheduler.json"
    if scheduler_file.exists():
        earlier = read_json(scheduler_file)
        client = _run_cluster_client(earlier)
        if client is not None:
            client.close()
            return earlier
        stop_run_cluster(earlier)
        scheduler_file.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    workers = _default_workers(wanted_workers, settings)
    command = [sys.executable, "-m", "lepton_tasks.infra.cluster", "--scheduler-file", str(scheduler_file),
               "--idle-timeout", str(RUN_CLUSTER_IDLE_S), *(["--workers", str(workers)] if workers else []),
               *(["--preload", VALIDATION_PRELOAD] if validation else [])]
    # nothing of the task's standard streams: under Airflow they are its supervisor's sockets, and a helper holding
    # one keeps that supervisor (a LocalExecutor worker slot) waiting for the end of the cluster, not of the task
    with open(folder / "cluster.log", "ab") as out:
        process = subprocess.Popen(command, start_new_session=True, cwd=folder, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, env=_helper_env())
    _wait_for_file(scheduler_file, process)
    info = {**read_json(scheduler_file), "pid": process.pid, "host": socket.gethostname(),
            "pid_started": _started_at(process.pid)}
    write_json(scheduler_file, info)
    _log_cluster(info, "for the run")
    return info


def await_run_cluster(settings: Settings, folder: Path, timeout_s: float = RUN_CLUSTER_WAIT_S) -> dict | None:
    """The run's cluster as `start_run_cluster` (the setup task, beside ingest) leaves it in `folder`, waiting up to
    `timeout_s` for it to answer: for a task that needs the cluster only sometimes, so it is not wired after the
    setup task and does not wait for the start when it does not need it. None when no cluster came (the task
    then starts one of its own, as for a cluster that is gone)."""
    import json

    external = _external_cluster(settings)
    if external:
        return external
    scheduler_file, deadline = folder / "scheduler.json", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = read_json(scheduler_file)
            if "pid" in info and _alive(info):  # start_run_cluster's, once it answered (Dask's own file has no
                return info                     # pid); a dead one is an earlier try's, which the setup replaces
        except (OSError, json.JSONDecodeError):  # not there yet, or Dask still writing it
            pass
        time.sleep(0.5)
    log.warning("the run's Dask cluster did not come up in %.0f s (see the dask_cluster task)", timeout_s)
    return None


def _process_of(run_cluster: dict):
    """The recorded cluster process on this host if it is still the one started (a reused pid is not ours: the
    command line is no proof, Dask retitles its scheduler), else None."""
    import psutil

    if not run_cluster.get("pid") or run_cluster.get("host") != socket.gethostname():
        return None
    try:
        process = psutil.Process(run_cluster["pid"])
        return process if _started_at(process.pid) == run_cluster.get("pid_started") else None
    except psutil.NoSuchProcess:
        return None


def _alive(run_cluster: dict) -> bool:
    """Whether the cluster process is still the one recorded (always so for one on another host: not checkable)."""
    return run_cluster.get("host") != socket.gethostname() or _process_of(run_cluster) is not None


def stop_run_cluster(run_cluster: dict) -> None:
    """Stop the run's cluster (its process and workers); nothing for an external scheduler or one already gone."""
    import psutil

    process = _process_of(run_cluster)
    if process is None:
        return
    try:
        _terminate(process)
    except psutil.NoSuchProcess:
        return
    log.info("stopped the run's Dask cluster at %s (pid %d)", run_cluster["address"], process.pid)


MAX_RECOVERIES = 5  # per stage body: a cluster that keeps failing under it is left to Airflow's retry


def is_cluster_fault(err: BaseException) -> bool:
    """Whether `err` is the cluster failing (futures cancelled because the scheduler connection was lost, a comm
    closed, a connection refused), not the work itself raising: a task's own OSError (a missing file) is not."""
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    return isinstance(err, (CancelledError, CommClosedError, ConnectionError))


def release_unused_memory() -> None:
    """Give the memory a finished task freed back to the OS: Arrow's pool and glibc's heap keep it otherwise
    (Dask's "memory not released back to the OS"), and the next stage's peak on the worker would sit on top of
    it. Runs on a worker (`release_worker_memory`)."""
    import ctypes

    import pyarrow

    pyarrow.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
        pass


def release_worker_memory(client) -> None:
    """`release_unused_memory` on every worker of `client`'s cluster, after a stage that read a lot of data on
    them (shard's partitions, before train loads its shards there); best effort: a worker that left has nothing
    to give back. Submitted as a task to each worker, not `client.run`: Arrow's allocator (mimalloc) keeps a heap
    per thread, and only the thread that ran the stage's tasks can give its heap back (`client.run` calls from
    the event loop's)."""
    try:
        client.gather([client.submit(release_unused_memory, workers=[address], allow_other_workers=False,
                                     pure=False) for address in client.scheduler_info(n_workers=-1)["workers"]])
    except Exception as err:
        log.info("could not release the workers' unused memory: %s", err)


def _mark_validation_done(dask_worker) -> None:
    """On a nanny: the worker it starts next skips the GX preload (`worker_preload_validation`)."""
    dask_worker.env[VALIDATION_DONE_ENV] = "1"


def restart_without_validation(client) -> None:
    """Restart the run's own workers once their partitioned validation is done, without GX: its import and what
    its checks left behind (a few hundred MB a worker, which no release gives back) would otherwise sit under the
    shards that train loads there. Their nannies start them again with the run's other preload (torch, on a
    thread); VALIDATION_DONE_ENV tells the GX preload to stay out. Best effort: a cluster that cannot restart
    keeps its workers as they are."""
    try:
        client.run(_mark_validation_done, nanny=True)
        client.restart()
    except Exception as err:
        log.warning("could not restart the run's workers after validation (%s: %s); they keep GX loaded",
                    type(err).__name__, err)


def call_by_name(target: str, *args):
    """Call `target` ("module:function") with `args` on a Dask worker. Dask's scheduler unpickles every task it is
    given, so a task that names its function's module, or carries an instance of a class from it, makes the
    scheduler import that module; for a stage module that imports torch that is seconds, in series before any
    worker could start. Submitted as `call_by_name` with plain-data arguments, only the worker imports it."""
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(*args)


def recovering(client, what: str, body: Callable[[int], T], timeout_s: float | None = None) -> T:
    """`body(attempt)`, called again (attempt 1, 2, ...) whenever the cluster fails under it, once the client has
    reconnected and a worker has joined; a ClusterError (retryable) when it has not within `timeout_s`.

    `body` must be idempotent: it starts from what earlier attempts wrote, never from their futures."""
    timeout_s = Settings.from_env().dask_recovery_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        try:
            return body(attempt)
        except Exception as err:
            if not is_cluster_fault(err):
                raise
            if attempt >= MAX_RECOVERIES:
                raise ClusterError(f"{what}: the Dask cluster failed under it {attempt + 1} times; Airflow's retry "
                                   "resumes from the outputs already written") from err
            log.warning("%s: the Dask cluster failed under it (%s: %s); waiting up to %.0fs for it to come back",
                        what, type(err).__name__, str(err).splitlines()[0] if str(err) else "", timeout_s)
            _wait_until_usable(client, deadline, what, err)
            attempt += 1
            log.warning("%s: the cluster is back (%d worker(s)); attempt %d resumes from what was written", what,
                        len(client.scheduler_info(n_workers=-1)["workers"]), attempt + 1)


def _wait_until_usable(client, deadline: float, what: str, cause: BaseException) -> None:
    """Block until the client is connected with at least one worker; ClusterError at `deadline`."""
    while time.monotonic() < deadline:
        if client.status in ("closing", "closed"):
            break  # it gave up reconnecting: only a new client (Airflow's retry) can go on
        try:
            if client.status == "running" and client.scheduler_info(n_workers=-1)["workers"]:
                return
        except Exception:  # still reconnecting
            pass
        time.sleep(0.5)
    raise ClusterError(f"{what}: the Dask cluster at {client.scheduler.address if client.scheduler else '?'} did "
                       f"not come back with a worker in time ({type(cause).__name__}: {cause}); Airflow's retry "
                       "resumes from the outputs already written") from cause


@contextmanager
def _local_cluster_process(n_workers: int | None) -> Iterator[Path]:
    """Run `python -m lepton_tasks.infra.cluster` until the block ends; yield its scheduler file."""
    with tempfile.TemporaryDirectory(prefix="lepton-dask-") as tmp:
        scheduler_file = Path(tmp) / "scheduler.json"
        command = [sys.executable, "-m", "lepton_tasks.infra.cluster", "--scheduler-file", str(scheduler_file)]
        if n_workers:
            command += ["--workers", str(n_workers)]
        process = subprocess.Popen(command, start_new_session=True, cwd=tmp, stdin=subprocess.DEVNULL,
                                   env=_helper_env())
        try:
            import distributed  # noqa: F401  (the client's import, paid while the helper starts)

            _wait_for_file(scheduler_file, process)
            yield scheduler_file
        finally:
            _stop(process)


def _helper_env() -> dict[str, str]:
    """This environment, less the mark a process that started a Dask cluster leaves for its children
    (`__DASK_PARENT_PID`), which would make Dask retitle the helper `dask scheduler [...]` in `ps`."""
    return {k: v for k, v in os.environ.items() if k != "__DASK_PARENT_PID"}


def _wait_for_file(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"the local Dask cluster process exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the local Dask cluster did not start within {START_TIMEOUT_S}s")
        time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    import psutil

    if process.poll() is None:
        try:
            _terminate(psutil.Process(process.pid))
        except psutil.NoSuchProcess:
            pass  # it exited just now
    process.wait()  # reaped


def _terminate(process) -> None:
    """SIGTERM a cluster helper (a `psutil.Process`): it closes its cluster; SIGKILL its whole session (the
    workers too) if it has not exited within STOP_TIMEOUT_S."""
    import psutil

    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def serve(scheduler_file: Path, n_workers: int | None, threads_per_worker: int, idle_timeout_s: float | None,
          preload: tuple[str, ...] = ()) -> None:
    """Start a local cluster (its workers also importing the `preload` modules as they start), publish its address
    in `scheduler_file`, and hold it until SIGTERM (or until it has had no client and no task for
    `idle_timeout_s`)."""
    logging.basicConfig(level=logging.INFO, format="[lepton.cluster] %(message)s")
    apply_config()
    cluster, kind = make_local_cluster(n_workers, threads_per_worker, preload)
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    # written atomically: the parent waits for this name and reads it at once
    write_json(scheduler_file, {"address": cluster.scheduler_address, "kind": kind,
                                "n_workers": len(cluster.workers), "dashboard_link": cluster.dashboard_link})
    busy_at = time.monotonic()
    while not stopped:
        time.sleep(0.2)
        if _in_use(cluster.scheduler):
            busy_at = time.monotonic()
        elif idle_timeout_s and time.monotonic() - busy_at > idle_timeout_s:
            logging.info("no client and no task for %.0fs: stopping", idle_timeout_s)
            break
    cluster.close(timeout=20)


def _in_use(scheduler) -> bool:
    clients = [c for c in list(scheduler.clients) if c != "fire-and-forget"]
    return bool(clients or scheduler.tasks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Hold a local Dask cluster for a Lepton task or run.")
    parser.add_argument("--scheduler-file", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--idle-timeout", type=float, default=None, help="stop after this many idle seconds")
    parser.add_argument("--preload", action="append", default=[], help="a module every worker imports as it starts")
    args = parser.parse_args(argv)
    serve(args.scheduler_file, args.workers, args.threads_per_worker, args.idle_timeout, tuple(args.preload))


if __name__ == "__main__":
    main()
