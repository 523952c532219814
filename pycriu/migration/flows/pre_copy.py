"""pre-copy: pre-dumps into the destination's page servers while the dirty set shrinks (the
policy decides), then the final, small dump into it, then restore. Needs soft-dirty tracking."""

from __future__ import annotations

import itertools
import time
from typing import Any

from ...enums import LogLevel
from ...options import PreDumpOptions
from ..images import list_images
from ..modes import FLOWS
from .base import Flow, FlowContext, FlowResult
from .page_server import dump_to_page_server

__all__ = ["FLOW", "PreCopy", "pre_copy_iterations"]


def pre_copy_iterations(run: FlowContext, *, local_pagemaps: bool = False) -> str:
    """Pre-dump into the destination's page servers until the policy says stop; return the last
    iteration's directory name (the parent of the final dump). With ``local_pagemaps``, each
    iteration's pagemaps also come back into its directory here (``run.scratch / name``): a final
    dump that writes locally (hybrid's lazy dump) finds which pages its parent holds only there."""
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
            extra_opts: dict[str, Any] = {**run.criu_tls_options(), **run.flags}
            result = run.criu.pre_dump(PreDumpOptions(
                pid=run.pid, images_dir=local, work_dir=run.src_logs, log_file=f"pre-dump-{i}.log",
                log_level=LogLevel.INFO,  # as the dump's: its log says what CRIU did, not only errors
                track_mem=True, page_server=run.relay(address), parent_images=f"../{parent}" if parent else None,
                **extra_opts))
            extra = [(img.name, img.path, None) for img in list_images(local)]
            if extra:
                run.client.send_images(name, extra)
            if local_pagemaps:
                run.client.fetch_pagemaps(name, local)
        n = result.stats.pages_written if result.stats else 0
        written.append(n)
        run.report.pre_copy.append({"iteration": i, "pages_written": n, "seconds": round(time.monotonic() - t0, 6)})
        if result.stats is not None:
            run.report.criu_stats.setdefault("pre_dumps", []).append(result.stats.to_dict())
        run.report.logs[f"source pre-dump-{i}"] = str(result.log_path)  # as its stem: one key per log
        parent = name
        decision = run.policy.decide(written)
        if not decision.another:
            run.report.pre_copy_stop = decision.reason
            return parent
    raise AssertionError("unreachable")


def pre_copied_pages(run: FlowContext) -> int:
    return sum(int(it["pages_written"]) for it in run.report.pre_copy)


class PreCopy(Flow):
    spec = FLOWS["pre-copy"]

    def run(self, run: FlowContext) -> FlowResult:
        parent = pre_copy_iterations(run)
        result = dump_to_page_server(run, parent=parent, track_mem=True, parent_images=f"../{parent}")
        result.add_pre_copied(pre_copied_pages(run))
        return result


FLOW = PreCopy
