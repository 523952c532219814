"""The migration flows: which side runs what, which channel carries the pages, what touches disk.

=======================  ==========================================  ============================
flow                     pages travel                                pages written to disk
=======================  ==========================================  ============================
classic                  as ``pages-*.img`` files over the control    source and destination
                         channel, after the dump
page-server              CRIU dump -> CRIU page server on the         destination only
                         destination, during the dump
lazy                     frozen source's CRIU (from memory) ->        neither (except the few
                         lazy-pages daemon on the destination,        non-lazy pages: stack,
                         after the destination resumed                vDSO, file-backed)
page-server-on-source    ``criu page-server --lazy-pages`` on the     source only (plus the
                         source (from its local dump) -> lazy-pages   non-lazy pages, sparse, on
                         daemon, after the destination resumed        the destination)
pre-copy                 pre-dumps then the final dump -> page        destination only
                         server on the destination
hybrid                   pre-dumps -> destination page server,        destination (pre-copied
                         then the rest lazily from the frozen source  pages only)
=======================  ==========================================  ============================

The rollback point is the ``commit`` message. Every flow dumps with ``leave_stopped``, and the
destination restores with its tree held stopped until the commit (the agent resumes it then), so
that at no time do two copies run. The classic, page-server, pre-copy and page-server-on-source
flows restore on the destination *inside* CRIU's ``post-dump`` notification: a failure before the
commit is sent answers post-dump with failure (CRIU resumes the source) and has the agent kill its
copy; once the commit is sent post-dump answers success whatever happens (the source stays
stopped), and the source is killed when the agent acknowledged the commit, or left stopped when
the acknowledgement never came (outcome ``unknown``). The lazy flows must answer ``post-dump`` at
once (CRIU serves the pages only afterwards); the source stays stopped until the destination
reports that every page arrived; it is then killed, or resumed if the destination failed.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

from .._threads import spawn
from ..options import PageServerAddress, PageServerOptions, PreDumpOptions
from ..results import DumpResult
from . import procs
from .errors import MigrationError, TransportError
from .images import PAGE_SIZE, list_images, non_lazy_ranges, pagemaps
from .uncork import Uncork

if TYPE_CHECKING:
    from .migration import MigrationRun

__all__ = ["FLOWS", "classic", "page_server", "lazy", "page_server_on_source", "pre_copy", "hybrid"]


def _all_images(run: MigrationRun) -> list[tuple[str, Any, None]]:
    assert run.images is not None
    return [(i.name, i.path, None) for i in list_images(run.images)]


def _account(run: MigrationRun, *, image_pages: int, server_pages: int, lazy_pages: int) -> None:
    run.report.pages = {"total": image_pages + server_pages + lazy_pages, "in_image_files": image_pages,
                        "via_page_server": server_pages, "lazy": lazy_pages}
    run.page_bytes = (server_pages + lazy_pages) * PAGE_SIZE


def _pagemap_counts(run: MigrationRun) -> tuple[int, int, int]:
    """(present, lazy-only, lazy-and-present) pages in the source's pagemaps."""
    assert run.images is not None
    present = lazy_only = both = 0
    for pm in pagemaps(run.images):
        for e in pm.entries:
            if e.present and e.lazy:
                both += e.nr_pages
            elif e.present:
                present += e.nr_pages
            elif e.lazy:
                lazy_only += e.nr_pages
    return present, lazy_only, both


# --- classic and page-server ----------------------------------------------------------------------


def classic(run: MigrationRun) -> None:
    """Dump to the source's disk; in post-dump, send every image (pages included) and restore."""

    def post_dump() -> None:
        run.send_images("images", _all_images(run))
        run.release_source_pages()
        run.restore_and_commit(lazy=False, page_server=None)

    run.record_dump(run.criu.dump(run.dump_options(notify=run.notify(post_dump))))
    stats = run.dump_stats()
    written = stats.pages_written if stats else _pagemap_counts(run)[0]
    _account(run, image_pages=written, server_pages=0, lazy_pages=0)
    run.custody.dump_returned()


def page_server(run: MigrationRun, *, parent: str | None = None, **dump_kw: Any) -> None:
    """The destination's CRIU page server receives the pages during the dump; the other images
    follow in post-dump; then restore."""
    assert run.client is not None
    with run.phase("page server start"):
        address = run.client.start_page_server("images", parent=parent, tls=bool(run.criu_tls_options()))

    def post_dump() -> None:
        run.send_images("images", _all_images(run))
        run.restore_and_commit(lazy=False, page_server=None)

    target = run.relay(address)
    with Uncork(target.port) as uncork:  # CRIU 4.2 would stall 200 ms, frozen, at the end of the dump
        run.record_dump(run.criu.dump(run.dump_options(page_server=target, notify=run.notify(post_dump), **dump_kw)))
    if not uncork.done:
        run.note(f"{uncork.note}: the dump may have waited 200 ms for CRIU's corked socket")
    stats = run.dump_stats()
    _account(run, image_pages=0, server_pages=stats.pages_written if stats else 0, lazy_pages=0)
    run.custody.dump_returned()


# --- the lazy flows -------------------------------------------------------------------------------


#: A lazy dump in a thread (:func:`pycriu._threads.spawn`): it returns only when every page was served.
_Dumper = Future[DumpResult]


def _ended(dumper: _Dumper, timeout: float | None = None) -> bool:
    """Wait up to ``timeout`` seconds for the dump to end; whether it has."""
    wait([dumper], timeout)
    return dumper.done()


def _dump_failed(dumper: _Dumper) -> bool:
    return dumper.done() and dumper.exception() is not None


def _wait_posted(posted: threading.Event, dumper: _Dumper) -> None:
    """Wait until post-dump answered (or the dump failed before, resuming the source)."""
    while not posted.wait(0.02):
        if dumper.done():
            break
    if not posted.is_set():
        dumper.result()  # raises what the dump raised
        raise MigrationError("the dump ended without reaching post-dump")


def _abort_lazy(run: MigrationRun, dumper: _Dumper, port: int, reason: str) -> None:
    """Before the destination took over: stop the agent's side, make CRIU's page server give up
    if nobody connected, and wait for the dump to end (the source is then resumed)."""
    assert run.client is not None
    run.custody.abort_destination(reason)  # its lazy-pages daemon then lets go of CRIU's page server
    if not dumper.done() and not procs.has_connection(port):
        procs.poison_lazy_server(run.source_address, port)
    if not _ended(dumper, 60):
        run.note("CRIU's lazy dump did not end within 60 s of the abort: the source may stay frozen "
                 f"(pid {run.pid}); its log: {run.src_logs}/dump.log")


def _finish_lazy(run: MigrationRun, wait_source: Callable[[float], bool], source_failed: Callable[[], bool]) -> None:
    """After the commit of a lazy flow: wait until every page is in, then kill the stopped source
    (success) or resume it (the destination failed and was killed by the agent)."""
    assert run.client is not None
    done: dict[str, Any] | None = None
    link_error: BaseException | None = None
    interrupted: BaseException | None = None
    run.phase_start("lazy page completion")
    try:
        done = run.client.lazy_wait(run.m.lazy_timeout)
    except MigrationError as exc:
        link_error = exc
    except KeyboardInterrupt as exc:  # the destination runs on these pages: finish first
        interrupted = exc
        run.note("interrupted during the lazy page transfer: waited for it to finish before stopping")
    finished = wait_source(run.m.lazy_timeout)
    run.phase_end("lazy page completion")
    if done is not None and done.get("uncork"):
        run.note(f"destination: {done['uncork']}: the end of the lazy transfer may have waited 200 ms for "
                 "CRIU's corked socket")
    if done is not None and done["ok"]:
        run.custody.hand_over()  # left stopped by CRIU (or resumed if CRIU failed late): one copy only
        if interrupted is not None:
            raise interrupted
        return
    if done is not None:  # the destination failed after resuming; the agent killed it
        run.custody.destination_failed(killed=bool(done["killed"]))
        raise MigrationError(f"lazy page transfer failed after the destination resumed: {done['error']}; "
                             f"the destination's copy was killed and the source resumed from the checkpoint "
                             "(whatever the destination did since the freeze is lost)")
    # The agent cannot be asked: decide from what the source knows.
    failed = finished and source_failed()
    run.custody.destination_lost(source_done=finished, source_failed=failed)
    if not finished:
        raise MigrationError(f"lost the agent ({link_error}) and CRIU is still serving pages: the source stays "
                             f"frozen (pid {run.pid}) until the transfer ends")
    if failed:
        # CRIU saw the page connection fail: the destination's daemon is gone, so the agent killed the
        # restored tree; CRIU itself resumed the source (or it was stopped: custody resumed it).
        raise MigrationError(f"lost the agent ({link_error}) and the page transfer failed: the source was resumed")
    raise MigrationError(f"lost the agent ({link_error}) after CRIU served every page it was asked for: the "
                         f"source is left STOPPED (pid {run.pid}) so that exactly one copy can run; check the "
                         "destination, then `kill -KILL` or `kill -CONT` the source tree")


def _finish_lazy_uncorked(run: MigrationRun, port: int, wait_source: Callable[[float], bool],
                          source_failed: Callable[[], bool]) -> None:
    """:func:`_finish_lazy`, with CRIU's page server on ``port`` uncorked: CRIU 4.2 answers the
    lazy-pages daemon's last command from a corked socket, 200 ms late. (Only now: the
    destination has resumed, so the watcher no longer competes with CRIU inside the downtime.)"""
    with Uncork(port, serving=True) as uncork:
        _finish_lazy(run, wait_source, source_failed)
    if not uncork.done:
        run.note(f"{uncork.note}: the end of the lazy transfer may have waited 200 ms for CRIU's corked socket")


def _after_lazy_commit(run: MigrationRun, wait_source: Callable[[float], bool],
                       source_failed: Callable[[], bool]) -> None:
    """A lazy flow failed once the commit was sent: if it was acknowledged, the destination owns
    the process: finish the page transfer (which kills the source) before the failure goes on;
    otherwise let CRIU serve whoever asks until the transfer ends, the source staying stopped."""
    if run.custody.committed:
        _finish_lazy(run, wait_source, source_failed)
    elif not wait_source(run.m.lazy_timeout):
        run.note("CRIU was still serving pages when the migration gave up")


def lazy(run: MigrationRun, **dump_kw: Any) -> None:
    """Post-copy: the frozen source's CRIU serves the pages from memory to the destination's
    lazy-pages daemon after the destination resumed."""
    assert run.client is not None
    port = procs.free_port(run.source_address)
    posted = threading.Event()
    sizes: dict[str, int] = {}
    pages_from = run.relay(PageServerAddress(run.source_address, port))

    def post_dump() -> None:
        # the destination starts its lazy-pages daemon as soon as the images it reads arrive
        run.send_images("images", _all_images(run), lazy_daemon=pages_from)
        posted.set()

    opts = run.dump_options(lazy_pages=True, lazy_address=run.source_address, lazy_port=port, leave_stopped=True,
                            notify=run.notify(post_dump), **dump_kw)
    dumper = spawn(run.criu.dump, opts, name=f"pycriu-lazy-dump-{run.pid}")
    run.cleanups.append(lambda: wait([dumper], 5))

    def wait_source(timeout: float) -> bool:
        return _ended(dumper, timeout)

    try:
        _wait_posted(posted, dumper)
        if not procs.wait_listening(port, run.m.timeout, alive=lambda: not dumper.done()):
            raise TransportError("CRIU's lazy page server did not start listening", log_path=opts.log_path)
        run.restore_and_commit(lazy=True, page_server=pages_from)
    except BaseException as exc:
        if run.custody.may_be_owned:
            # never abort nor resume now: the destination may run on pages this source serves
            _after_lazy_commit(run, wait_source, lambda: _dump_failed(dumper))
            raise
        if not posted.is_set() and not dumper.done():
            # interrupted while the dump thread is before or inside post-dump: make post-dump fail
            # (CRIU then resumes the tree) and wait for it, so that nobody else uses the channel
            run.cancel.set()
            _ended(dumper, run.m.timeout)
        if posted.is_set():
            _abort_lazy(run, dumper, port, f"source failed: {exc!r}")
        raise

    present, lazy_only, _ = _pagemap_counts(run)  # after the resume: not in the downtime
    sizes.update(present=present, lazy=lazy_only)
    _finish_lazy_uncorked(run, port, wait_source, lambda: _dump_failed(dumper))
    if dumper.done() and dumper.exception() is None:
        run.record_dump(dumper.result(), stats=False)
        run.note("CRIU's statistics of a lazy dump are not meaningful (zero pages, a bogus frozen time) and "
                 "are left out; the page figures come from the pagemaps")
    _account(run, image_pages=sizes.get("present", 0), server_pages=0, lazy_pages=sizes.get("lazy", 0))


def page_server_on_source(run: MigrationRun) -> None:
    """The source dumps to its own disk; in post-dump it sends the non-page images (and the few
    non-lazy pages, as a sparse page image), starts ``criu page-server --lazy-pages`` over its
    images and has the destination restore lazily from it."""
    assert run.client is not None and run.images is not None and run.src_logs is not None
    holder: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    port = procs.free_port(run.source_address)
    pages_from = run.relay(PageServerAddress(run.source_address, port))

    def start_page_server() -> None:
        assert run.images is not None and run.src_logs is not None
        ps = run.criu.page_server(PageServerOptions(images_dir=run.images, work_dir=run.src_logs,
                                                    lazy_pages=True, address=run.source_address, port=port,
                                                    timeout=run.m.timeout, **run.criu_tls_options()))
        holder["ps"] = ps  # before the start: stopped at the end even if its start fails
        ps.start()

    def post_dump() -> None:
        assert run.images is not None and run.src_logs is not None
        # CRIU's page server starts over the local images while the other images travel, and
        # the destination's lazy-pages daemon starts as soon as the images it reads arrived
        run.phase_start("page server start")
        starter = spawn(start_page_server, name="pycriu-page-server-start")
        try:
            maps = {pm.pages_name: pm for pm in pagemaps(run.images)}
            files: list[tuple[str, Any, list[tuple[int, int]] | None]] = []
            for img in list_images(run.images):
                pm = maps.get(img.name)
                files.append((img.name, img.path, non_lazy_ranges(pm) if pm is not None else None))
            present, _, both = _pagemap_counts(run)
            sizes.update(present=present, lazy=both)
            run.send_images("images", files, lazy_daemon=pages_from,
                            detail=f"{len(files)} files; page images sparse: only the {present} non-lazy pages")
        finally:
            wait([starter])
            if "ps" in holder:
                run.cleanups.append(lambda: _stop(holder["ps"]))
            run.phase_end("page server start", "concurrent with the image transfer" if starter.exception() is None
                          else "(failed)")
        starter.result()  # raises what the start raised
        run.restore_and_commit(lazy=True, page_server=pages_from)

    run.record_dump(run.criu.dump(run.dump_options(leave_stopped=True, notify=run.notify(post_dump))))
    ps = holder["ps"]
    run.report.logs["source page-server"] = str(ps.log_path)

    def wait_source(timeout: float) -> bool:
        try:
            ps.wait(timeout)
        except TimeoutError:
            return False
        except Exception:  # noqa: BLE001 - failed: see source_failed
            holder["failed"] = True
        return True

    if run.custody.deferred is not None:  # post-dump failed after the commit was sent
        try:
            _after_lazy_commit(run, wait_source, lambda: bool(holder.get("failed")))
        finally:
            run.custody.raise_deferred()
    _finish_lazy_uncorked(run, port, wait_source, lambda: bool(holder.get("failed")))
    _account(run, image_pages=sizes.get("present", 0), server_pages=0, lazy_pages=sizes.get("lazy", 0))


def _stop(daemon: Any) -> None:
    daemon.stop(grace=1.0)


# --- iterative ------------------------------------------------------------------------------------


def _pre_copy_iterations(run: MigrationRun) -> str:
    """Pre-dump into the destination's page servers until the policy says stop; return the last
    iteration's directory name (the parent of the final dump)."""
    assert run.client is not None and run.scratch is not None and run.src_logs is not None
    written: list[int] = []
    parent: str | None = None
    for i in itertools.count(1):
        name = f"pre-{i}"
        local = run.scratch / name
        local.mkdir()
        t0 = time.monotonic()
        with run.phase(f"pre-dump {i}"):
            run.custody.pre_copying()
            address = run.client.start_page_server(name, parent=parent, tls=bool(run.criu_tls_options()))
            extra_opts: dict[str, Any] = {**run.criu_tls_options(), **run.m.flags}
            result = run.criu.pre_dump(PreDumpOptions(
                pid=run.pid, images_dir=local, work_dir=run.src_logs, log_file=f"pre-dump-{i}.log",
                track_mem=True, page_server=run.relay(address), parent_images=f"../{parent}" if parent else None,
                **extra_opts))
            extra = [(img.name, img.path, None) for img in list_images(local)]
            if extra:
                run.client.send_images(name, extra)
        n = result.stats.pages_written if result.stats else 0
        written.append(n)
        run.report.pre_copy.append({"iteration": i, "pages_written": n, "seconds": round(time.monotonic() - t0, 6)})
        if result.stats is not None:
            run.report.criu_stats.setdefault("pre_dumps", []).append(result.stats.to_dict())
        run.report.logs[f"source pre-dump {i}"] = str(result.log_path)
        parent = name
        decision = run.m.policy.decide(written)
        if not decision.another:
            run.report.pre_copy_stop = decision.reason
            return parent
    raise AssertionError("unreachable")


def pre_copy(run: MigrationRun) -> None:
    """Iterative pre-copy: pre-dumps into the destination's page server while the dirty set
    shrinks, then the final (small) dump into it, then restore."""
    parent = _pre_copy_iterations(run)
    page_server(run, parent=parent, track_mem=True, parent_images=f"../{parent}")
    pre_pages = sum(it["pages_written"] for it in run.report.pre_copy)
    run.report.pages["pre_copied"] = pre_pages
    run.page_bytes += pre_pages * PAGE_SIZE


def hybrid(run: MigrationRun) -> None:
    """Pre-copy, then a lazy final dump: what is still dirty follows after the resume."""
    assert run.client is not None
    parent = _pre_copy_iterations(run)
    run.client.prepare_dir("images", parent=parent)
    lazy(run, track_mem=True, parent_images=f"../{parent}")
    pre_pages = sum(it["pages_written"] for it in run.report.pre_copy)
    run.report.pages["pre_copied"] = pre_pages
    run.page_bytes += pre_pages * PAGE_SIZE


FLOWS: dict[str, Callable[[MigrationRun], None]] = {
    "classic": classic,
    "page-server": page_server,
    "lazy": lazy,
    "page-server-on-source": page_server_on_source,
    "pre-copy": pre_copy,
    "hybrid": hybrid,
}
