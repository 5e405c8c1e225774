"""Keep one service process running: start it again whenever it exits, until this process is told to stop.

`lepton up` runs each Dask process under this, as systemd's `Restart=always` or a Kubernetes Deployment would:
a `dask worker` exits for good when it loses its scheduler, and a scheduler that dies must come back at the same
address for the workers and the running tasks' clients to find it again.

    python -m lepton_tasks.tools.supervisor -- dask worker tcp://127.0.0.1:8786 ...

SIGTERM (or SIGINT) stops the child and then the supervisor; `lepton down` sends it to the whole process group.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 10.0
HEALTHY_AFTER_S = 60.0  # a child that ran this long starts the back-off again from the first delay


def supervise(command: list[str], first_delay_s: float = FIRST_DELAY_S) -> int:
    """Run `command` until SIGTERM/SIGINT, restarting it (with back-off) whenever it exits; returns 0."""
    stopping: list[int] = []
    child: subprocess.Popen | None = None

    def stop(signum, _frame) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    delay = first_delay_s
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen(command)
        code = child.wait()
        if stopping:
            break
        delay = first_delay_s if time.monotonic() - started > HEALTHY_AFTER_S else delay
        print(f"[lepton.supervisor] {command[0]} exited with code {code}; starting it again in {delay:.0f}s",
              file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(delay * 2, MAX_DELAY_S)
    if child is not None and child.poll() is None:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to keep running, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    sys.exit(supervise(command))


if __name__ == "__main__":
    main()
