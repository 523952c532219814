"""Process trees and sockets as the kernel shows them in ``/proc`` (both sides use these)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

__all__ = ["tree_state", "comm", "descendants", "kill_tree", "wait_gone", "resume_tree", "resume_until_running",
           "is_listening", "has_connection", "wait_listening", "free_port", "tcp_sockets", "TCP_ESTABLISHED",
           "poison_lazy_server", "address_towards"]


def _task_state(path: str) -> str | None:
    """The one-letter state in ``PATH/stat`` (a process's or a thread's), or ``None`` if gone."""
    try:
        stat = Path(f"{path}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def comm(pid: int) -> str | None:
    """The command name of ``pid`` (``/proc/PID/comm``: not read from the process's memory,
    which a lazily restored tree may not have yet), or ``None`` when it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


_SIGSTOP_BIT = 1 << (signal.SIGSTOP - 1)


def _stop_pending(path: str) -> bool:
    """A SIGSTOP is queued for the task at ``path`` (its own or its process's queue) and not yet
    taken. The kernel fills these lines under the process's signal lock."""
    try:
        status = Path(f"{path}/status").read_text()
    except OSError:
        return False
    return any(line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & _SIGSTOP_BIT
               for line in status.splitlines())


def _stop_state(pending: bool, states: list[str | None]) -> str:
    """The verdict of :func:`tree_state` from what it read: ``pending`` (a SIGSTOP is queued)
    and the states of the process's threads, read *after* the queues."""
    alive = [s for s in states if s is not None and s not in ("Z", "X", "x")]
    if not alive:
        return "gone"
    if pending or any(s in ("T", "t") for s in alive):
        return "stopped"
    return "running"


def tree_state(pid: int) -> str:
    """``running``, ``stopped`` (stopped, traced, or with a SIGSTOP sent and not yet acted on) or
    ``gone`` (no such process, or only zombies left) for the root of a tree.

    A stop that was sent must never read as running, yet the kernel shows it in two places one
    after the other: queued (``SigPnd``/``ShdPnd``), then, once a thread has taken it, that
    thread's state ``T``; the other threads (the leader too) stop a moment later. Taking the
    signal and setting ``T`` happen under the process's signal lock, which ``/proc/PID/status``
    also takes to print the queues, while the states are read without it. So the queues are read
    first and every thread's state after them: a stop that left the queue before the first read
    shows as a ``T`` in the second. (Read the other way round, a stop taken between the two
    reads is in neither: that was the race.)
    """
    base = f"/proc/{pid}"
    try:
        tids = os.listdir(f"{base}/task")
    except OSError:
        return "gone"
    tasks = [f"{base}/task/{tid}" for tid in tids]
    pending = any(_stop_pending(t) for t in tasks)
    return _stop_state(pending, [_task_state(t) for t in tasks])


def _walk(pid: int) -> list[tuple[int, list[int]]]:
    """``pid`` and every process below it, each with its threads' ids (itself included), from
    ``/proc/PID/task/TID/children``; a process gone meanwhile has no threads."""
    found: list[tuple[int, list[int]]] = []
    pids = [pid]
    seen = {pid}
    i = 0
    while i < len(pids):
        p = pids[i]
        i += 1
        try:
            tasks = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            found.append((p, []))
            continue
        found.append((p, tasks))
        for t in tasks:
            try:
                children = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                if c not in seen:
                    seen.add(c)
                    pids.append(c)
    return found


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from ``/proc/PID/task/TID/children``)."""
    return [p for p, _ in _walk(pid)]


def tree_ids(pid: int) -> list[int]:
    """Every id a restore of ``pid``'s tree takes back: each process's PID (:func:`descendants`)
    and each of its threads' TIDs. A thread's TID is a PID like any other: left out of
    :func:`hold_back_pids`, the next thread or process started on the host (the agent's, CRIU's
    helpers) took one the restore needed ("Unable to create a thread: -17", zdtm's socket_aio)."""
    return [i for p, tasks in _walk(pid) for i in [p, *(t for t in tasks if t != p)]]


TCP_LISTEN = 10


@dataclass
class TreeResources:
    """What a live tree needs from the host it is restored on (the pre-flight's questions)."""

    #: regular files it holds open or maps (executables and libraries included): path -> size
    files: dict[str, int] = field(default_factory=dict)
    #: listening TCP ports -> the pid that holds each
    tcp_ports: dict[int, int] = field(default_factory=dict)
    #: Unix sockets bound to a path -> pid
    unix_paths: dict[str, int] = field(default_factory=dict)
    #: FIFOs opened by path -> (pid, fd)
    fifos: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: files it holds a lock on (flock, POSIX or OFD: ``lock:`` lines of fdinfo) -> (pid, kind)
    locks: dict[str, tuple[int, str]] = field(default_factory=dict)

    def host_names(self) -> list[str]:
        """The names only one process on a host can hold, as phrases naming each and its process."""
        return ([f"FIFO {path} (pid {pid}, fd {fd})" for path, (pid, fd) in self.fifos.items()]
                + [f"listening TCP port {port} (pid {pid})" for port, pid in self.tcp_ports.items()]
                + [f"Unix socket bound to {path} (pid {pid})" for path, pid in self.unix_paths.items()]
                + [f"{kind} lock on {path} (pid {pid})" for path, (pid, kind) in self.locks.items()])


def _regular(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _lock_kind(pid: int, fd: str) -> str | None:
    """The kind of the first lock held through ``fd`` (``FLOCK``, ``POSIX``, ``OFDLCK``), from
    the ``lock:`` lines the kernel adds to fdinfo; None when it holds none."""
    try:
        text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("lock:"):
            fields = line.split()
            return fields[2] if len(fields) > 2 else "file"
    return None


def tree_resources(pid: int) -> TreeResources:
    """Read off ``/proc`` (fds, maps, exe), the kernel's TCP socket table and ``/proc/net/unix``
    what the tree rooted at ``pid`` holds. Deleted files, anonymous and special files are left
    out: CRIU carries those in its images."""
    found = TreeResources()
    sockets: dict[int, int] = {}
    for p in descendants(pid):
        paths: list[str] = []
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    target = os.readlink(f"/proc/{p}/fd/{fd}")
                    if target.startswith("socket:["):
                        sockets[int(target[8:-1])] = p
                    elif target.startswith("/") and stat.S_ISFIFO(os.stat(f"/proc/{p}/fd/{fd}").st_mode):
                        found.fifos.setdefault(target, (p, fd))
                    else:
                        paths.append(target)
                        kind = _lock_kind(p, fd)
                        if kind is not None and target.startswith("/"):
                            found.locks.setdefault(target, (p, kind))
                except (OSError, ValueError):
                    continue
            paths.append(os.readlink(f"/proc/{p}/exe"))
            for line in Path(f"/proc/{p}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6:
                    paths.append(fields[5])
        except OSError:
            continue
        for path in paths:
            if path.startswith("/") and not path.endswith(" (deleted)") and path not in found.files \
                    and not path.startswith(("/proc/", "/sys/", "/dev/", "/memfd:")):
                size = _regular(path)
                if size is not None:
                    found.files[path] = size
    if not sockets:
        return found
    for port, _, inode in tcp_sockets(TCP_LISTEN):
        if inode in sockets:
            found.tcp_ports[port] = sockets[inode]
    try:
        unix = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        unix = []
    for line in unix:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith("/") and int(fields[6]) in sockets:
            found.unix_paths[fields[7]] = sockets[int(fields[6])]
    return found


def host_names(pid: int) -> list[str]:
    """What the tree holds that only one process on a host can hold (:meth:`TreeResources.host_names`).
    On one host a source kept stopped still holds them while the destination restores, and
    CRIU's restore fails ("Address already in use", "Error splicing data")."""
    return tree_resources(pid).host_names()


def kill_tree(pid: int) -> int | None:
    """SIGKILL the tree rooted at ``pid`` (stopped first so that nothing forks away).

    Returns ``pid`` if it existed, else ``None``."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    for p in reversed(descendants(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return pid


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait until ``pid`` is gone or a zombie (a SIGKILL takes effect asynchronously)."""
    deadline = time.monotonic() + timeout
    while tree_state(pid) != "gone":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def pid_namespace(pid: int | str = "self") -> int | None:
    """The inode of ``pid``'s PID namespace (None when it is gone)."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def shares_pid_namespace(pid: int) -> bool:
    """``pid`` lives in this process's PID namespace (a restore here needs its PIDs back)."""
    ns = pid_namespace(pid)
    return ns is not None and ns == pid_namespace()


def pids_taken(pids: Iterable[int], timeout: float = 10.0) -> list[str]:
    """Wait until none of ``pids`` exists any more, not even as a zombie, and return the ones
    still taken after ``timeout`` (as phrases naming each and the parent that keeps it).

    A tree restored in the PID namespace it was dumped from needs its own PIDs back, and the
    zombie of a process the dump killed keeps its PID until its parent reaps it ("Can't fork
    for PID: File exists"). Zombies that are this process's own children (a runtime that
    started the workload and migrates it) are reaped here: the exit status of a copy that was
    migrated means nothing (a ``subprocess.Popen`` then reads 0)."""
    left = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        for p in list(left):
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
            if not os.path.exists(f"/proc/{p}"):
                left.discard(p)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    taken = []
    for p in sorted(left):
        try:
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone since
        taken.append(f"pid {p} (a zombie until its parent, pid {ppid}, reaps it)")
    return taken


NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def hold_back_pids(pids: Iterable[int]) -> bool:
    """Move this PID namespace's allocation cursor (``ns_last_pid``) to the highest of ``pids``,
    freed for a restore that takes them back: the kernel hands out PIDs upwards from the cursor,
    so the processes started meanwhile (the agent's threads, CRIU's own helpers, anything on a
    busy host) take PIDs above them instead of one the restore needs ("Can't fork for PID:
    File exists"). Once the PIDs have wrapped around ``pid_max`` (32768 by default), a freed
    PID is otherwise among the next ones given out. Returns whether the cursor could be set."""
    pids = list(pids)
    if not pids:
        return False
    try:
        NS_LAST_PID.write_text(str(max(pids)))
    except OSError:
        return False  # not allowed here (no CAP_CHECKPOINT_RESTORE/CAP_SYS_ADMIN): the race stays
    return True


def own_pid(pid: int) -> int | None:
    """``pid``'s number in its own (innermost) PID namespace, as CRIU's images name it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return pid


def resume_tree(pid: int, keep_stopped: Mapping[int, int] | None = None) -> None:
    """SIGCONT every process of the tree (CRIU's ``leave_stopped`` left them stopped), except
    the ones the dump found stopped (``keep_stopped``: their own pid -> the signal that stopped
    them, see :func:`pycriu.migration.images.stopped_tasks`): those stay stopped. CRIU stopped
    them again with SIGSTOP; one stopped by job control (SIGTSTP, SIGTTIN, SIGTTOU) gets its own
    signal back, as CRIU does without ``leave_stopped``: SIGCONT then that signal, which the
    task takes before it returns to user space (a parent's ``waitpid`` then reads that signal)."""
    for p in descendants(pid):
        signo = keep_stopped.get(own_pid(p) or 0) if keep_stopped else None
        try:
            if signo is None:
                os.kill(p, signal.SIGCONT)
            elif signo in _JOB_CONTROL_STOPS:
                os.kill(p, signal.SIGCONT)
                os.kill(p, signo)
        except OSError:
            pass


_JOB_CONTROL_STOPS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def resume_until_running(pid: int, timeout: float = 2.0, keep_stopped: Mapping[int, int] | None = None) -> str:
    """Resume a tree that CRIU left stopped, and see that it stays running: the SIGSTOP CRIU
    sends as it detaches may land after a first look found the tree running. Returns the state
    at the end (``running`` unless it is gone, or still stopped after ``timeout``). A root that
    was stopped before the dump (in ``keep_stopped``) stays stopped: the others are resumed once."""
    if keep_stopped and own_pid(pid) in keep_stopped:
        resume_tree(pid, keep_stopped)
        return tree_state(pid)
    deadline = time.monotonic() + timeout
    running_since: float | None = None
    while True:
        state = tree_state(pid)
        now = time.monotonic()
        if state == "gone":
            return state
        if state == "stopped":
            resume_tree(pid, keep_stopped)
            running_since = None
        elif running_since is None:
            running_since = now
        elif now - running_since >= 0.05:
            return "running"
        if now > deadline:
            return state
        time.sleep(0.005)


# TCP states (include/net/tcp_states.h) and the sock_diag netlink request for them.
TCP_ESTABLISHED, _TCP_LISTEN = 1, 10
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, _NLM_F_DUMP = 4, 20, 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3


def tcp_sockets(state: int) -> list[tuple[int, int, int]]:
    """(local port, remote port, inode) of this network namespace's TCP sockets in ``state``,
    from the kernel's sock_diag netlink interface. (Reading ``/proc/net/tcp`` walks the whole
    connection hash table: 8 ms per read on a 24 GiB machine, too slow to poll inside a downtime;
    it is the fallback where sock_diag is not available, in some containers.)"""
    try:
        return _diag_tcp_sockets(state)
    except OSError:
        return _proc_tcp_sockets(state)


def _proc_tcp_sockets(state: int) -> list[tuple[int, int, int]]:
    found: list[tuple[int, int, int]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[3], 16) == state:
                found.append((int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16),
                              int(fields[9])))
    return found


def _diag_tcp_sockets(state: int) -> list[tuple[int, int, int]]:
    found: list[tuple[int, int, int]] = []
    for msg in _diag_tcp(1 << state):  # no sock_diag for TCP here (module not loaded): OSError
        # inet_diag_msg: family, state, timer, retrans; the sockid (48 bytes: ports big-endian
        # first); expires, rqueue, wqueue, uid, then the inode
        sport, dport = struct.unpack_from("!HH", msg, 4)
        inode = struct.unpack_from("=I", msg, 68)[0]
        found.append((sport, dport, inode))
    return found


_INET_DIAG_INFO = 2  # the rtattr carrying struct tcp_info
_TCPI_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked), Linux >= 4.1


def tcp_bytes_acked(*, local_port: int | None = None, remote_port: int | None = None) -> int | None:
    """The bytes the peers acknowledged on this network namespace's established TCP sockets
    with that local or remote port, summed (``tcp_info.tcpi_bytes_acked``, from sock_diag): how
    far a CRIU page connection has got. None where sock_diag gives no TCP info."""
    total = 0
    try:
        for msg in _diag_tcp(1 << TCP_ESTABLISHED, ext=1 << (_INET_DIAG_INFO - 1)):
            sport, dport = struct.unpack_from("!HH", msg, 4)
            if (local_port is not None and sport != local_port) or (remote_port is not None and dport != remote_port):
                continue
            off = 72  # the attributes follow inet_diag_msg
            while off + 4 <= len(msg):
                rta_len, rta_type = struct.unpack_from("=HH", msg, off)
                if rta_len < 4:
                    break
                if rta_type == _INET_DIAG_INFO and rta_len >= 4 + _TCPI_BYTES_ACKED + 8:
                    total += struct.unpack_from("=Q", msg, off + 4 + _TCPI_BYTES_ACKED)[0]
                off += (rta_len + 3) & ~3
    except OSError:
        return None
    return total


def _diag_tcp(states: int, *, ext: int = 0) -> Iterator[bytes]:
    """The inet_diag_msg payloads (with the ``ext`` attributes) of this network namespace's TCP
    sockets in ``states`` (a bit mask), IPv4 then IPv6, from one sock_diag dump each. An error
    reply is an OSError."""
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            # nlmsghdr, then inet_diag_req_v2: family, protocol, ext, pad, states, a zero sockid
            req = struct.pack("=BBBBI48x", family, socket.IPPROTO_TCP, ext, 0, states)
            nl.send(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
                    + req)
            yield from _diag_replies(nl)


def _diag_replies(nl: socket.socket) -> Iterator[bytes]:
    """The payloads of one sock_diag dump's replies, until NLMSG_DONE (an error is an OSError)."""
    while True:
        data = nl.recv(65536)
        if not data:
            return
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if kind == _NLMSG_ERROR:
                code = -struct.unpack_from("=i", data, off + 16)[0]
                raise OSError(code, f"sock_diag: {os.strerror(code)}")
            if kind == _NLMSG_DONE or length < 16:
                return
            yield data[off + 16:off + length]
            off += (length + 3) & ~3


def _tcp_ports(state: int) -> set[int]:
    return {sport for sport, _, _ in tcp_sockets(state)}


def is_listening(port: int) -> bool:
    return port in _tcp_ports(_TCP_LISTEN)


def has_connection(port: int) -> bool:
    """Whether a TCP connection is established on local ``port`` (someone was accepted there)."""
    return port in _tcp_ports(TCP_ESTABLISHED)


def wait_listening(port: int, timeout: float, alive: object = None) -> bool:
    """Wait until something listens on local TCP ``port``; ``alive()`` False stops waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_listening(port):
            return True
        if callable(alive) and not alive():
            return False
        time.sleep(0.001)
    return False


def free_port(address: str) -> int:
    """A TCP port free on ``address`` right now (CRIU's lazy dump refuses port 0)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def poison_lazy_server(address: str, port: int) -> bool:
    """Make a lazy dump's page server (blocked waiting for its one client) fail, so CRIU resumes
    the frozen tree: connect and send a request with an unknown command. Returns True if sent."""
    try:
        with socket.create_connection((address, port), timeout=2) as s:
            s.sendall(bytes(24))  # struct page_server_iov with cmd 0: "Unknown command"
            s.settimeout(2)
            try:
                s.recv(1)
            except OSError:
                pass
        return True
    except OSError:
        return False


def address_towards(host: str) -> str:
    """This host's source address for reaching ``host`` (no packet is sent)."""
    try:
        info = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as s:
            s.connect(info[4])
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
