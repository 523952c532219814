"""The two "hosts" of the benchmark: network namespaces the harness makes, uses and always deletes.

::

    pycriu-bench-src                                   pycriu-bench-dst
    (the harness, the workload, source-side CRIU)      (agent, page server, lazy-pages, restore)
    lo   127.0.0.1  <- the "lo" link
    pcb-src 10.213.77.1/30  <== veth, netem on both ends ==>  pcb-dst 10.213.77.2/30

The harness process itself enters ``pycriu-bench-src`` (``setns``) for the whole run, so the
workload, pycriu and the source-side ``criu`` all share that network namespace (CRIU dumps a
tree whose network namespace is its own without dumping the namespace) and every byte on its
``lo`` and veth is ours: the machine's other traffic (other test runs on the host's loopback)
never shows in the counters. The "lo" link is that namespace's loopback; the "netem" link is the
veth pair with ``tc netem rate 1gbit delay 1ms`` on both ends. Only addresses inside these two
namespaces are ever targeted.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SRC_NS = "pycriu-bench-src"
DST_NS = "pycriu-bench-dst"
SRC_IF = "pcb-src"
DST_IF = "pcb-dst"
SRC_ADDR = "10.213.77.1"
DST_ADDR = "10.213.77.2"
PREFIX = 30
TBF_BURST = "512kb"
TBF_LATENCY = "20ms"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Link:
    """Where each side of a flow listens, and how to run a command on the destination side."""

    name: str           # "lo" or "netem"
    src_addr: str       # the source's address as the destination sees it
    dst_addr: str       # the destination's address as the source sees it
    dst_prefix: tuple[str, ...]  # argv prefix that runs a command on the destination
    counter_if: str     # interface whose counters measure the bytes of this link
    description: str

    def dst(self, argv: list[str]) -> list[str]:
        return [*self.dst_prefix, *argv]

    def counter(self) -> int:
        """Bytes that crossed this link so far (the source namespace's /proc/net/dev).

        On the veth both directions count (rx + tx); on loopback every packet is sent once and
        received once, so tx alone counts it.
        """
        rx, tx = _net_dev()[self.counter_if]
        return tx if self.counter_if == "lo" else rx + tx


def _net_dev() -> dict[str, tuple[int, int]]:
    # /proc/self/net is the calling thread's network namespace (unlike /sys/class/net, which is
    # the namespace sysfs was mounted in).
    out: dict[str, tuple[int, int]] = {}
    with open("/proc/thread-self/net/dev") as f:
        for line in f.readlines()[2:]:
            name, rest = line.split(":", 1)
            cols = rest.split()
            out[name.strip()] = (int(cols[0]), int(cols[8]))
    return out


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def delete_namespaces() -> None:
    """Delete our two namespaces if they exist (leftovers of a killed run included)."""
    for ns in (SRC_NS, DST_NS):
        if os.path.exists(f"/run/netns/{ns}"):
            _ip("netns", "del", ns, check=False)


@contextmanager
def topology(*, rate: str = "1gbit", delay: str = "1ms", limit: int = 10000) -> Iterator[dict[str, Link]]:
    """Make both namespaces and the veth link, enter the source namespace, yield the links.

    On every way out (errors and KeyboardInterrupt included) the harness returns to its original
    network namespace and both namespaces are deleted (which deletes the veth pair).
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    entered = False
    try:
        delete_namespaces()
        _ip("netns", "add", SRC_NS)
        _ip("netns", "add", DST_NS)
        _ip("-n", SRC_NS, "link", "set", "lo", "up")
        _ip("-n", DST_NS, "link", "set", "lo", "up")
        _ip("-n", SRC_NS, "link", "add", SRC_IF, "type", "veth", "peer", "name", DST_IF, "netns", DST_NS)
        _ip("-n", SRC_NS, "addr", "add", f"{SRC_ADDR}/{PREFIX}", "dev", SRC_IF)
        _ip("-n", DST_NS, "addr", "add", f"{DST_ADDR}/{PREFIX}", "dev", DST_IF)
        _ip("-n", SRC_NS, "link", "set", SRC_IF, "up")
        _ip("-n", DST_NS, "link", "set", DST_IF, "up")
        for ns, dev in ((SRC_NS, SRC_IF), (DST_NS, DST_IF)):
            shaping = _shape(ns, dev, rate=rate, delay=delay, limit=limit)
        _setns(f"/run/netns/{SRC_NS}")
        entered = True
        yield {
            "lo": Link("lo", "127.0.0.1", "127.0.0.1", (), "lo",
                       "loopback (inside the source namespace)"),
            "netem": Link("netem", SRC_ADDR, DST_ADDR, ("ip", "netns", "exec", DST_NS), SRC_IF,
                          f"veth between two namespaces, {shaping} on both ends"),
        }
    finally:
        try:
            if entered:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"cannot return to the original network namespace: {os.strerror(err)}")
        finally:
            os.close(home)
            delete_namespaces()


def _shape(ns: str, dev: str, *, rate: str, delay: str, limit: int) -> str:
    """Shape ``dev``: ``netem rate delay`` where the kernel has netem, else ``tbf`` (rate only).

    Returns a description of what was set up. Some kernels (this project's VM among them) are
    built without ``CONFIG_NET_SCH_NETEM``; then the link is rate-limited by a token bucket and has
    no added delay, and the description says so.
    """
    netem = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "rate", rate,
                            "delay", delay, "limit", str(limit)], capture_output=True, text=True)
    if netem.returncode == 0:
        return f"netem rate {rate} delay {delay}"
    if "unknown" not in netem.stderr.lower():
        raise RuntimeError(f"tc netem on {ns}/{dev} failed: {netem.stderr.strip()}")
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", TBF_BURST, "latency", TBF_LATENCY],
                   check=True, capture_output=True, text=True)
    return (f"tbf rate {rate} burst {TBF_BURST} latency {TBF_LATENCY} "
            f"(no {delay} delay: this kernel has no netem, CONFIG_NET_SCH_NETEM is not set)")


def netem_settings(ns: str = SRC_NS, dev: str = SRC_IF) -> str:
    out = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True)
    return out.stdout.strip()
