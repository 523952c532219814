"""A runc container's migration from the source's side: the options runc would use, remapped
for the destination, and runc's bookkeeping once the destination runs it. The same as
``Migration(ct.pid, to, mode, container=ct.options().remap(...), runtime=RuncTarget(...))``
followed by ``ct.delete(force=True)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..containers.runc import RuncContainer, RuncTarget
from ..errors import InvalidOptionError
from .migration import Migration
from .report import MigrationReport

__all__ = ["runc_migration", "migrate_runc"]


def runc_migration(container: RuncContainer, to: str = "local", mode: str = "auto", *, target: RuncTarget,
                   remap: Mapping[str, Mapping[str, str]] | None = None, choices: Mapping[str, Any] | None = None,
                   **kw: Any) -> Migration:
    """A :class:`~pycriu.Migration` of a runc container to ``target`` (its bundle, id and runc
    state directory on the destination, where ``runc restore`` brings it back under runc): the
    dump uses the options runc would (:meth:`RuncContainer.options
    <pycriu.containers.RuncContainer.options>` with ``choices``), their restore half remapped
    with ``remap`` (``{"paths": {...}, "cgroups": {...}, "interfaces": {...}}``, see
    :meth:`ContainerOptions.remap <pycriu.containers.ContainerOptions.remap>`). ``kw`` are
    Migration's other arguments."""
    options = container.options(**dict(choices or {}))
    if remap:
        unknown = set(remap) - {"paths", "cgroups", "interfaces"}
        if unknown:
            raise InvalidOptionError(f"remap: unknown table(s) {sorted(unknown)}: use paths, cgroups, interfaces")
        options = options.remap(**remap)
    return Migration(container.pid, to, mode, container=options, runtime=target, **kw)


def migrate_runc(container: RuncContainer, to: str = "local", mode: str = "auto", *, target: RuncTarget,
                 remap: Mapping[str, Mapping[str, str]] | None = None, choices: Mapping[str, Any] | None = None,
                 **kw: Any) -> MigrationReport:
    """Run :func:`runc_migration`; once the destination runs the container, delete it from this
    host's runc, as ``runc checkpoint`` does. A failure raises
    :class:`~pycriu.MigrationError` (its report says where the container runs) and leaves this
    host's runc as it was."""
    report = runc_migration(container, to, mode, target=target, remap=remap, choices=choices, **kw).run()
    container.delete(force=True)
    return report
