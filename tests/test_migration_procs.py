"""What the source reads from the kernel about its processes and sockets while the tree is frozen
(:mod:`pycriu.migration.procs`). Ports come from the kernel's sock_diag interface, not from
``/proc/net/tcp`` (a read of which walks the whole connection hash table: 8 ms on the 24 GiB VM,
polled inside a lazy flow's downtime; its cost is measured by the benchmark, not here)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from conftest import needs_root

from pycriu.migration import procs


def test_listening_and_connected_ports_are_seen_for_both_families() -> None:
    with socket.create_server(("127.0.0.1", 0)) as v4, \
            socket.create_server(("::1", 0), family=socket.AF_INET6) as v6:
        port4, port6 = v4.getsockname()[1], v6.getsockname()[1]
        assert procs.is_listening(port4) and procs.is_listening(port6)
        assert not procs.has_connection(port4)
        with socket.create_connection(("127.0.0.1", port4)) as client:
            accepted, _ = v4.accept()
            with accepted:
                assert procs.has_connection(port4)
                assert procs.has_connection(client.getsockname()[1])  # the client's end, too
    assert not procs.is_listening(port4) and not procs.is_listening(port6)


def test_proc_net_tcp_is_the_fallback_and_agrees() -> None:
    """Where sock_diag is missing (some containers), the ports come from /proc/net/tcp."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            with accepted:
                for state in (procs.TCP_ESTABLISHED, 10):  # established, listening
                    ours = [{e for e in found if port in e[:2]}
                            for found in (procs._proc_tcp_sockets(state), procs.tcp_sockets(state))]
                    assert ours[0] == ours[1] and ours[0]


def test_a_stopped_tree_reads_stopped_and_a_reaped_one_gone() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        assert procs.tree_state(proc.pid) == "running"
        os.kill(proc.pid, signal.SIGSTOP)
        assert procs.tree_state(proc.pid) == "stopped"
        procs.resume_tree(proc.pid)
        assert procs.tree_state(proc.pid) == "running"
        procs.kill_tree(proc.pid)
        proc.wait()
        assert procs.tree_state(proc.pid) == "gone"
    finally:
        proc.kill()
        proc.wait()


_BUSY_THREADS = """
import threading, time
def spin():
    while True:
        pass
for _ in range(3):
    threading.Thread(target=spin, daemon=True).start()
while True:
    time.sleep(0.0005)
"""


def test_a_sent_stop_never_reads_as_running_while_threads_take_it() -> None:
    """Between a thread taking a SIGSTOP off the queue and the whole process reading ``T``,
    neither the queue nor the leader shows it: three spinning threads and a leader that wakes
    every 0.5 ms make that window wide. Read in the wrong order, about 3 in 100 stops read as
    running here (22 of 500 in one run; 1 in 3 without the old settle loop)."""
    proc = subprocess.Popen([sys.executable, "-c", _BUSY_THREADS])
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{proc.pid}/task")) < 4:
            assert time.monotonic() < deadline, "the workload did not start its threads"
            time.sleep(0.01)
        misread = 0
        for _ in range(500):
            os.kill(proc.pid, signal.SIGSTOP)
            misread += procs.tree_state(proc.pid) != "stopped"
            os.kill(proc.pid, signal.SIGCONT)
        assert misread == 0
        assert procs.resume_until_running(proc.pid) == "running"
    finally:
        proc.kill()
        proc.wait()


def test_the_verdict_from_what_was_read() -> None:
    """The decision itself, from queues and thread states (no root, no process)."""
    assert procs._stop_state(False, ["R", "S"]) == "running"
    assert procs._stop_state(True, ["R", "S"]) == "stopped"     # sent, not yet taken
    assert procs._stop_state(False, ["R", "T"]) == "stopped"    # taken by one thread, leader still R
    assert procs._stop_state(False, ["t"]) == "stopped"         # traced (CRIU holds it)
    assert procs._stop_state(False, ["Z", "R"]) == "running"    # the leader exited, a thread runs
    assert procs._stop_state(True, ["Z"]) == "gone"
    assert procs._stop_state(False, [None]) == "gone"           # vanished between the reads


def test_a_late_sigstop_does_not_leave_a_resumed_tree_stopped() -> None:
    """CRIU's SIGSTOP as it detaches may land after a first look found the tree running: the
    source is resumed until it stays running."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(proc.pid, signal.SIGSTOP)

        def late_stop() -> None:
            time.sleep(0.02)
            os.kill(proc.pid, signal.SIGSTOP)

        stopper = threading.Thread(target=late_stop)
        stopper.start()
        assert procs.resume_until_running(proc.pid) == "running"
        stopper.join()
        assert procs.tree_state(proc.pid) == "running"
    finally:
        proc.kill()
        proc.wait()


def test_the_pids_of_an_ended_tree_are_free_once_its_zombie_child_is_reaped() -> None:
    """A workload this process started and whose dump killed it stays a zombie holding its PID
    (a restore under that PID would fail: "File exists") until reaped: pids_taken reaps it."""
    child = subprocess.Popen(["sleep", "60"])
    assert procs.shares_pid_namespace(child.pid)
    os.kill(child.pid, signal.SIGKILL)
    while procs.tree_state(child.pid) != "gone":  # a zombie now, its PID still taken
        time.sleep(0.01)
    assert os.path.exists(f"/proc/{child.pid}")
    assert procs.pids_taken([child.pid], timeout=2) == []
    assert not os.path.exists(f"/proc/{child.pid}")
    assert child.wait(timeout=1) == 0  # Popen reads a reaped child as 0


def test_a_zombie_another_process_keeps_is_named_with_its_parent(zombie: tuple[int, int]) -> None:
    """A zombie whose parent does not reap it is reported, with the parent to blame."""
    pid, parent = zombie
    taken = procs.pids_taken([pid], timeout=0.2)
    assert taken == [f"pid {pid} (a zombie until its parent, pid {parent}, reaps it)"]


@needs_root
def test_pids_freed_for_a_restore_are_not_the_next_ones_handed_out() -> None:
    """After the PIDs wrap around pid_max, a freed PID can be the very next one given out: the
    agent's threads or CRIU's helpers took the tree's PID before its restore (zdtm maps06,
    page-server on one host: "Can't fork for PID: File exists"). release() moves the cursor."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    procs.NS_LAST_PID.write_text(str(gone.pid - 1))  # the next process would get gone.pid
    assert procs.hold_back_pids([gone.pid])
    nxt = subprocess.Popen(["true"])
    nxt.wait()
    assert nxt.pid != gone.pid


def test_a_trees_ids_are_its_processes_and_their_threads() -> None:
    """What a restore takes back: every process's PID and every thread's TID (the AIO threads of
    zdtm's socket_aio were restored after the agent's own threads had taken their TIDs)."""
    code = ("import os, subprocess, sys, threading, time\n"
            "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout is not None
        child = int(p.stdout.readline())
        threads = {int(t) for t in os.listdir(f"/proc/{p.pid}/task")} - {p.pid}
        assert len(threads) == 3
        ids = procs.tree_ids(p.pid)
        assert ids[0] == p.pid and set(ids) == {p.pid, child, *threads}
        assert procs.descendants(p.pid) == [p.pid, child]  # processes only
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the child too
        p.wait()
        p.stdout.close()
