"""Looking inside a checkpoint: ``pycriu inspect DIR``, and the Python API under it.

- :func:`inspect`: the process tree (commands, threads, namespaces, cgroups), open files and
  sockets, mounts, memory maps with how much of each the images hold, CRIU's dump statistics:
  one :class:`Inspection` (``to_dict()`` is the ``--json`` output).
- Memory, searching it, and comparing two checkpoints live a layer down, in
  :mod:`pycriu.images.memory` and :mod:`pycriu.images.diff`.
"""

from __future__ import annotations

from .build import images_dir, inspect
from .model import Inspection, MountInfo, OpenFd, Process, SocketInfo, Thread

__all__ = ["inspect", "images_dir", "Inspection", "Process", "Thread", "OpenFd", "SocketInfo", "MountInfo"]
