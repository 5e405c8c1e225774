"""Several hosts on one machine: each a Linux network namespace on a bridge, for faults that cross a network.

    with Network.create() as net:
        scheduler, worker = net.host("sched"), net.host("a")
        worker.popen(["lepton", "dask-worker", f"tcp://{scheduler.address}:8786"], hide=(Path("var"), Path("/tmp")))
        worker.cut()          # its link down: packets dropped both ways, no connection closed
        worker.throttle(10)   # its link at 10 Mbit/s (tc tbf; this kernel has no netem)

Addresses come from 198.18.0.0/15 (RFC 2544's range for such tests), on this network's own veths and bridge
only; the machine's own namespace reaches every host through the bridge. Needs root (`ip netns`), as in CI.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


def available() -> str | None:
    """Why hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    return None


def stop_sessions(processes: Iterable[subprocess.Popen], grace_s: float = 40) -> None:
    """Stop each process's whole session (a `lepton dask-*` supervisor and its Dask processes), stopped
    (SIGSTOP) ones included: SIGCONT and SIGTERM, then SIGKILL after `grace_s`."""
    processes = list(processes)
    for process in processes:
        os.killpg(process.pid, signal.SIGCONT)
        os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    subprocess.run(command, check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    name: str  # its network namespace
    address: str
    link: str  # its veth's end on the bridge: what `cut` and `throttle` act on

    def command(self, argv: list[str], hide: tuple[Path, ...] = ()) -> list[str]:
        """`argv` on this host; `hide`: folders it sees as empty tmpfs mounts of its own (`unshare -m`, a private
        mount namespace), so that nothing passes through them between hosts."""
        if hide:
            mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(path))}" for path in hide)
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *argv]
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: list[str], hide: tuple[Path, ...] = (), **kwargs) -> subprocess.Popen:
        """Start `argv` on this host (in its network namespace), in a session of its own."""
        return subprocess.Popen(self.command(argv, hide), start_new_session=True, **kwargs)

    def cut(self) -> None:
        _ip("link", "set", self.link, "down")

    def restore(self) -> None:
        _ip("link", "set", self.link, "up")

    def throttle(self, mbit: int) -> None:
        """Both ways at `mbit` Mbit/s: tbf on the bridge's end (traffic to the host) and on the host's own end."""
        tbf = ["root", "tbf", "rate", f"{mbit}mbit", "burst", "32kb", "latency", "400ms"]
        for command in (["tc", "qdisc", "replace", "dev", self.link, *tbf],
                        self.command(["tc", "qdisc", "replace", "dev", "eth0", *tbf])):
            subprocess.run(command, check=True, capture_output=True, text=True)


@dataclass
class Network:
    """A bridge in this namespace and the hosts on it; `close` removes every one of them."""

    prefix: str  # names: {prefix}-br, {prefix}-{host}, {prefix}-{host}-v
    subnet: int  # 198.18.{subnet}.0/24
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    @property
    def gateway(self) -> str:
        """This (the machine's own) namespace's address on the bridge."""
        return f"198.18.{self.subnet}.1"

    @classmethod
    def create(cls) -> Network:
        number = os.getpid() % 250 + 1
        net = cls(f"lpt{number}", number)
        net.close()  # what a killed earlier run of this pid left
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        return net

    def host(self, role: str) -> Host:
        name, link = f"{self.prefix}-{role}", f"{self.prefix}-{role}-v"
        address = f"198.18.{self.subnet}.{10 + len(self.hosts)}"
        _ip("netns", "add", name)
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("link", "set", link, "master", self.bridge)
        _ip("link", "set", link, "up")
        _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=name)
        _ip("link", "set", "eth0", "up", netns=name)
        _ip("link", "set", "lo", "up", netns=name)
        self.hosts[role] = Host(name, address, link)
        return self.hosts[role]

    def close(self) -> None:
        listed = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        for name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            if name.startswith(f"{self.prefix}-"):
                subprocess.run(["ip", "netns", "delete", name], capture_output=True)  # its veths go with it
        if f" {self.bridge}:" in listed:
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        self.hosts.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
