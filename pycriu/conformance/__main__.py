"""``python -m pycriu.conformance --mode cli,criu,classic [--flavor h,ns] --tests a,b | --all [--json OUT]``.

Prints per flavor and mode passed/failed/skipped, then every test a pycriu mode fails where the
CLI passes in the same flavor, with the error (CRIU's first error line)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .flavor import FLAVORS, Flavor, HostFlavor, NsFlavor
from .suite import MODES, Outcome, ZdtmTest, default_zdtm_dir, eligible, load_tests, run_trial


def worse_than_cli(results: list[Outcome]) -> list[Outcome]:
    """The trials a pycriu mode failed although the CLI passed the same test in the same run."""
    by = {(o.test, o.mode, o.flavor): o for o in results}
    return [o for o in results if o.mode != "cli" and o.result == "failed"
            and by.get((o.test, "cli", o.flavor), o).result == "passed"]


def table(results: list[Outcome], modes: list[str], flavors: tuple[str, ...] | list[str] = ("h",)) -> str:
    """Per flavor and mode passed/failed/skipped, as a reStructuredText table (docs/conformance.rst)."""
    rows = [("flavor", "mode", "passed", "failed", "skipped")]
    for f in flavors:
        for m in modes:
            r = [o.result for o in results if o.mode == m and o.flavor == f]
            rows.append((f, m, str(r.count("passed")), str(r.count("failed")), str(r.count("skipped"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(c.ljust(w) for c, w in zip(rows[0], widths, strict=True)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows[1:]]
    return "\n".join([*lines, rule])


def run_flavor(flavor: Flavor, tests: list[ZdtmTest], modes: list[str], criu_bin: str) -> list[Outcome]:
    """Every mode of every test in one flavor, printed as they end."""
    results = []
    for t in tests:
        why = eligible(t, criu_bin, flavor.name)
        for m in modes:
            o = Outcome(t.name, m, "skipped", why, flavor=flavor.name) if why else \
                run_trial(t, m, criu_bin=criu_bin, flavor=flavor)
            results.append(o)
            print(f"{t.name:24} {flavor.name:3} {m:22} {o.result:8} {o.reason}"[:200], flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pycriu.conformance", description=__doc__)
    p.add_argument("--mode", default="cli,criu", help=f"all, or comma-separated, of {', '.join(MODES)}")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tests", help="comma-separated zdtm test names")
    g.add_argument("--all", action="store_true", help="every built test of static/")
    p.add_argument("--flavor", default="h", help=f"comma-separated zdtm flavors, of {', '.join(FLAVORS)}")
    p.add_argument("--zdtm-dir", type=Path, default=default_zdtm_dir())
    p.add_argument("--criu", default="/usr/local/sbin/criu")
    p.add_argument("--jobs", type=int, default=1, help="only 1 (zdtm tests share names and ports)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    modes = list(MODES) if a.mode == "all" else a.mode.split(",")
    flavors = a.flavor.split(",")
    bad = [m for m in modes if m not in MODES] + [f for f in flavors if f not in FLAVORS]
    if bad or a.jobs != 1:
        p.error(f"unknown mode or flavor {bad}" if bad else "--jobs: only 1 is supported")
    tests = {t.name: t for t in load_tests(a.zdtm_dir)}
    names = sorted(tests) if a.all else a.tests.split(",")
    missing = [n for n in names if n not in tests]
    if missing:
        p.error(f"not built in {a.zdtm_dir}/static: {', '.join(missing)} (run scripts/zdtm.sh NAME)")
    results: list[Outcome] = []
    for f in flavors:
        with (NsFlavor(a.zdtm_dir) if f == "ns" else HostFlavor()) as flavor:
            results += run_flavor(flavor, [tests[n] for n in names], modes, a.criu)
    print()
    print(table(results, modes, flavors))
    worse = worse_than_cli(results)
    if worse:
        print("\npycriu fails where the CLI passes:")
        for o in worse:
            print(f"  {o.test} [{o.mode}, {o.flavor}]: {o.reason}")
    if a.json:
        a.json.write_text(json.dumps([o.as_dict() for o in results], indent=1))
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
