"""`lepton dask-scheduler` and `lepton dask-worker`: the Dask processes of a cluster that spans machines.

    lepton dask-scheduler [--host H] [--port 8786] [--dashboard-address :8787]   # on the scheduler host
    lepton dask-worker tcp://H:8786 [--nworkers N] [any `dask worker` option]   # on each worker host

Each is Dask's own command (`dask scheduler`, `dask worker`, or `dask cuda worker` where torch can use a GPU) run
with Lepton's Dask settings (`cluster.LEPTON_DASK_CONFIG`: the worker preload, the training-speed settings, a lost
host given up within a minute), kept running by `lepton_tasks.tools.supervisor`: a worker exits for good when it
loses its scheduler, and a scheduler that dies must come back at the same address. `make up` runs the same
commands. The settings are applied in the process itself, so a worker host needs nothing but Lepton installed.
"""

from __future__ import annotations

import argparse
import os
import sys

from lepton_tasks.infra.cluster import apply_config, gpu_count

DEFAULT_PORT = 8786
ROLES = ("scheduler", "worker", "cuda-worker")


def supervised(role: str, args: list[str]) -> list[str]:
    """The command line of one supervised Dask process of `role` with Dask's own `args`."""
    if role not in ROLES:
        raise ValueError(f"unknown Dask role {role!r} (one of {', '.join(ROLES)})")
    return [sys.executable, "-m", "lepton_tasks.tools.supervisor", "--",
            sys.executable, "-m", "lepton_tasks.tools.dask_hosts", role, *args]


def scheduler_command(host: str | None, port: int, dashboard_address: str | None) -> list[str]:
    return supervised("scheduler", [*(["--host", host] if host else []), "--port", str(port),
                                    *(["--dashboard-address", dashboard_address] if dashboard_address else [])])


def worker_command(address: str, nworkers: int | None, extra: list[str] = ()) -> list[str]:
    """One worker process per GPU where torch can use one (dask-cuda's own choice), else `nworkers` (default: one
    per core) single-threaded workers: a shard trains on one thread (the determinism policy) and Dask's
    parallelism is across shards."""
    if gpu_count():
        return supervised("cuda-worker", [address, *extra])
    count = nworkers or os.cpu_count() or 1
    return supervised("worker", [address, "--nworkers", str(count), "--nthreads", "1", *extra])


def _dask_cli(role: str):
    if role == "scheduler":
        from distributed.cli.dask_scheduler import main
    elif role == "worker":
        from distributed.cli.dask_worker import main
    else:
        from dask_cuda.cli import worker as main
    return main


def main(argv: list[str] | None = None) -> None:
    """`python -m lepton_tasks.tools.dask_hosts ROLE ARGS...`: Dask's ROLE command with Lepton's settings."""
    role, *args = sys.argv[1:] if argv is None else argv
    apply_config()
    _dask_cli(role).main(args=args, prog_name=f"dask {role.replace('-', ' ')}")


def parser(commands) -> None:
    """Add `dask-scheduler` and `dask-worker` to the `lepton` command's subparsers."""
    scheduler = commands.add_parser("dask-scheduler", help="run a Dask scheduler with Lepton's settings (supervised)")
    scheduler.add_argument("--host", help="the address to listen on (default: every interface)")
    scheduler.add_argument("--port", type=int, default=DEFAULT_PORT)
    scheduler.add_argument("--dashboard-address", help="default :8787")
    worker = commands.add_parser("dask-worker", help="run this host's Dask workers with Lepton's settings "
                                 "(supervised); other options go to `dask worker`")
    worker.add_argument("address", help="the scheduler, tcp://HOST:PORT")
    worker.add_argument("--nworkers", type=int, help="worker processes (default: one per core; on GPUs one per GPU)")


def command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    if args.command == "dask-scheduler":
        return scheduler_command(args.host, args.port, args.dashboard_address)
    return worker_command(args.address, args.nworkers, extra)


if __name__ == "__main__":
    main()
