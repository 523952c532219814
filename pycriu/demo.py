"""``make demo``: checkpoint a live sample workload and bring it back, printing what happened."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .criu import Criu
from .errors import CriuError
from .options import DumpOptions, RestoreOptions
from .workload import Workload


def main() -> int:
    criu = Criu()
    print(f"pycriu demo: CRIU {criu.version()} at {criu.binary}")
    with tempfile.TemporaryDirectory(prefix="pycriu-demo-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        with Workload(Path(tmp) / "state", mib=64) as w:
            before = w.wait_beats(3)
            print(f"workload pid {w.pid}: {before['mib']} MiB, heartbeat {before['beat']}, "
                  f"memory checksum {w.expected_checksum}")
            events: list[str] = []
            try:
                dump = criu.dump(DumpOptions(pid=w.pid, images_dir=images,
                                             notify=lambda action, pid: events.append(action)))
                restored = criu.restore(RestoreOptions(images_dir=images))
            except CriuError as exc:
                print(f"demo failed: {exc}", file=sys.stderr)
                return 1
            w.adopt(restored.pid)
            after = w.wait_beats(3)
            same = w.checksum() == w.expected_checksum
            assert dump.stats is not None and restored.stats is not None
            print(f"dumped: frozen {dump.stats.frozen_time * 1000:.0f} ms, "
                  f"{dump.stats.pages_written} pages written; notifications: {', '.join(events)}")
            print(f"restored as pid {restored.pid} in {restored.stats.restore_time * 1000:.0f} ms; "
                  f"heartbeat {after['beat']} and counting; memory intact: {same}")
            return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
