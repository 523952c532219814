"""``python -m bench.timelines``: the pictures of docs/benchmarks.rst, "Where the downtime goes".

One migration per flow of a 64 MiB sample workload to a local agent, each drawn with
:meth:`pycriu.migration.MigrationReport.timeline_svg` into ``OUT/timeline-FLOW.svg`` (default
``docs/_static``). As root, on a quiet machine: the pictures show one run, not a median.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pycriu.migration import Migration
from pycriu.workload import Workload

FLOWS = ("classic", "page-server", "lazy", "page-server-on-source")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "_static"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.timelines", description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(FLOWS), help="flows to draw (default: %(default)s)")
    p.add_argument("--mib", type=int, default=64, help="memory of the workload (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory of the SVG files")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pycriu-timelines-") as tmp:
        for mode in (m.strip() for m in args.modes.split(",") if m.strip()):
            with Workload(Path(tmp) / f"state-{mode}", mib=args.mib) as w:
                w.wait_beats(3)
                report = Migration(w.pid, to="local", mode=mode).run()
                if report.destination_pid is not None:
                    w.adopt(report.destination_pid)
                path = args.out / f"timeline-{mode}.svg"
                path.write_text(report.timeline_svg())
                print(f"{path}: {mode}, downtime {report.downtime * 1000:.1f} ms" if report.downtime is not None
                      else f"{path}: {mode}")


if __name__ == "__main__":
    main()
