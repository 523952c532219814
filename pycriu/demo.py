"""``make demo``: checkpoint a live sample workload and bring it back, printing what happened."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .criu import Criu
from .errors import CriuError
from .workload import Workload


def main() -> int:
    from .errors import KernelUnsupportedError
    from .migration import Migration, MigrationError, Progress

    criu = Criu()
    print(f"pycriu demo: CRIU {criu.version()} at {criu.binary}")
    print("lazy (post-copy) migration of a live sample workload to a local agent: a separate process with "
          "its own directories, reached like a remote host")
    with tempfile.TemporaryDirectory(prefix="pycriu-demo-") as tmp:
        with Workload(Path(tmp) / "state", mib=64) as w:
            before = w.wait_beats(3)
            print(f"workload pid {w.pid}: {before['mib']} MiB, heartbeat {before['beat']}, "
                  f"memory checksum {w.expected_checksum}")

            def show(event: Progress) -> None:
                if event.event == "end":
                    print(f"  {event.phase:<22} {(event.seconds or 0) * 1000:8.1f} ms", flush=True)

            try:
                try:
                    report = Migration(w.pid, to="local", mode="lazy", progress=show).run()
                except KernelUnsupportedError as exc:
                    print(f"lazy migration is not possible here ({exc.message}): letting pycriu choose")
                    report = Migration(w.pid, to="local", mode="auto", progress=show).run()
            except MigrationError as exc:
                print(f"demo failed: {exc}", file=sys.stderr)
                if exc.report is not None:
                    print(exc.report, file=sys.stderr)
                return 1
            except CriuError as exc:
                print(f"demo failed: {exc}", file=sys.stderr)
                return 1
            assert report.destination_pid is not None
            w.adopt(report.destination_pid)
            after = w.wait_beats(3)
            same = w.checksum() == w.expected_checksum
            print()
            print(report)
            print()
            print(f"the workload runs on as pid {report.destination_pid}: heartbeat {after['beat']} and counting; "
                  f"memory intact: {same}; source gone: {not w.alive(report.pid)}")
            return 0 if same else 1

if __name__ == "__main__":
    sys.exit(main())
