"""``pycriu inspect`` and ``pycriu diff`` for people: the same data as ``--json``, as text."""

from __future__ import annotations

from collections.abc import Iterable

from ..images.diff import CheckpointDiff
from ..images.formats import human
from ..images.memory import PAGE_SIZE, Hit
from ..migration.modes import DirtyAdvice
from .model import Inspection, Process

__all__ = ["SECTIONS", "render", "render_hits", "render_diff"]

#: what ``pycriu inspect`` can show, in its order (``--ps`` and so on pick them)
SECTIONS = ("ps", "files", "sockets", "mounts", "mems", "stats")


def _ms(us: int) -> str:
    return f"{us / 1000:.1f} ms"


def _summary(i: Inspection) -> list[str]:
    threads = sum(len(p.threads) for p in i.processes)
    lines = [f"checkpoint {i.path}",
             f"  {len(i.processes)} processes, {threads} threads, {human(i.pages_bytes)} of pages in the images"
             + (f", builds on {i.parent}" if i.parent else "")]
    if i.criu_run_id:
        lines.append(f"  CRIU run {i.criu_run_id}, image version {i.image_version}, LSM {i.lsm or 'none'}")
    if i.container:
        lines.append("  container " + ", ".join(f"{k} {v}" for k, v in i.container.items() if v))
    for ns, name in i.hostnames.items():
        lines.append(f"  hostname {name} (UTS namespace {ns})")
    return lines


def _tree(i: Inspection) -> list[str]:
    by_pid = {p.pid: p for p in i.processes}
    kids: dict[int, list[Process]] = {}
    roots = []
    for p in i.processes:
        if p.ppid in by_pid:
            kids.setdefault(p.ppid, []).append(p)
        else:
            roots.append(p)
    lines = ["", f"{'PID':>7} {'PPID':>7} {'PGID':>7} {'SID':>7}  {'STATE':<8} {'THR':>3} {'UID':>5}  COMMAND"]

    def walk(p: Process, depth: int) -> None:
        cmd = " ".join(p.cmdline) if p.cmdline else f"[{p.comm}]"
        state = p.state + (f" {p.exit_code}" if p.exit_code is not None else "")
        uid = "" if p.uid is None else str(p.uid)
        lines.append(f"{p.pid:>7} {p.ppid:>7} {p.pgid:>7} {p.sid:>7}  {state:<8} {len(p.threads):>3} {uid:>5}  "
                     f"{'  ' * depth}{'`- ' if depth else ''}{cmd}")
        for k in kids.get(p.pid, []):
            walk(k, depth + 1)

    for r in roots:
        walk(r, 0)
    return lines


def _files(i: Inspection) -> list[str]:
    lines = ["", "open files"]
    for p in i.processes:
        lines.append(f"  {p.pid} {p.comm}")
        for fd in p.fds:
            lines.append(f"    {fd.fd!s:>6}  {fd.type:<8} {fd.description}")
    return lines


def _sockets(i: Inspection) -> list[str]:
    lines = ["", "sockets", f"  {'FAMILY':<8} {'PROTO':<6} {'STATE':<12} {'LOCAL':<28} {'REMOTE':<28} HELD BY (pid:fd)"]
    for s in i.sockets:
        lines.append(f"  {s.family:<8} {s.proto:<6} {s.state:<12} {s.local or '-':<28} {s.remote or '-':<28} "
                     f"{' '.join(s.holders)}")
    return lines


def _mounts(i: Inspection) -> list[str]:
    lines = ["", "mounts"]
    if not i.mounts:
        lines.append("  (none dumped: the tree shares the host's mount namespace)")
    for m in i.mounts:
        ext = f"  external {m.external}" if m.external else ""
        root = f" [{m.root}]" if m.root not in ("/", "") else ""
        lines.append(f"  {m.mountpoint:<32} {m.fstype:<10} {m.source}{root}{ext}")
    return lines


def _mems(i: Inspection) -> list[str]:
    lines = ["", "memory (pages: in these images / in the parent checkpoint / lazy, at the source)"]
    for p in i.processes:
        own = sum(m.pages_images for m in p.mappings)
        parent = sum(m.pages_parent for m in p.mappings)
        lazy = sum(m.pages_lazy for m in p.mappings)
        size = sum(m.size for m in p.mappings)
        lines.append(f"  {p.pid} {p.comm}: {len(p.mappings)} mappings, {human(size)} mapped, "
                     f"{human(own * PAGE_SIZE)} in images, {human(parent * PAGE_SIZE)} in parent, "
                     f"{human(lazy * PAGE_SIZE)} lazy")
        for m in p.mappings:
            counts = f"{m.pages_images}/{m.pages_parent}/{m.pages_lazy}"
            lines.append(f"    {m.start:012x}-{m.end:012x} {m.prot} {human(m.size):>7} {counts:>13}  "
                         f"{m.kind:<13} {m.name}")
    return lines


def _stats(i: Inspection) -> list[str]:
    s = i.stats
    if not s:
        return ["", "dump statistics: none (no stats-dump in the directory)"]
    lines = ["", "dump statistics (CRIU's stats-dump)"]
    times = [f"{k.removesuffix('_time')} {_ms(v)}" for k, v in s.items() if k.endswith("_time")]
    lines.append("  " + ", ".join(times))
    counts = [f"{k} {v}" for k, v in s.items() if not k.endswith("_time")]
    lines.append("  " + ", ".join(counts))
    return lines


def render(i: Inspection, sections: Iterable[str]) -> str:
    """The text of ``pycriu inspect`` with the given :data:`SECTIONS`."""
    want = set(sections)
    out = _summary(i)
    for name, part in (("ps", _tree), ("files", _files), ("sockets", _sockets), ("mounts", _mounts),
                       ("mems", _mems), ("stats", _stats)):
        if name in want:
            out.extend(part(i))
    return "\n".join(out)


def render_hits(what: str, count: int, hits: list[Hit]) -> str:
    lines = [f"{count} occurrence{'s' if count != 1 else ''} of {what}"
             + (f" (the first {len(hits)} shown)" if len(hits) < count else "")]
    for h in hits:
        m = h.mapping
        lines.append(f"  pid {h.pid} {h.address:#014x}  in {m.start:012x}-{m.end:012x} {m.prot} {m.kind}"
                     + (f" {m.name}" if m.name else "") + f" +{h.address - m.start:#x}")
    return "\n".join(lines)


def render_diff(d: CheckpointDiff, advice: DirtyAdvice | None) -> str:
    lines = [f"{d.a} -> {d.b}" + (f" ({d.interval:.1f} s apart)" if d.interval else ""),
             f"  pages compared {d.total('compared')}, changed {d.total('changed')}, new {d.total('new')}, "
             f"gone {d.total('gone')}: {human(d.rewritten_bytes)} rewritten"
             + (f", {human(d.dirty_rate)}/s" if d.dirty_rate is not None else "")]
    if d.only_in_a or d.only_in_b:
        lines.append(f"  processes gone: {d.only_in_a or 'none'}, new: {d.only_in_b or 'none'}")
    rows = [m for m in d.mappings if m.changed or m.new or m.gone]
    if rows:
        lines.append(f"  {'PID':>7}  {'MAPPING':<25} {'CHANGED':>8} {'NEW':>8} {'GONE':>8} {'OF':>8}  KIND NAME")
    for m in rows:
        lines.append(f"  {m.pid:>7}  {m.mapping.start:012x}-{m.mapping.end:012x} {m.changed:>8} {m.new:>8} "
                     f"{m.gone:>8} {m.compared:>8}  {m.mapping.kind} {m.mapping.name}")
    if advice is not None:
        lines.append(f"  migration: {', '.join(advice.modes)} ({advice.reason})")
    return "\n".join(lines)
