"""Checks any test that made a real dump can run on its images: every image decodes and encodes
back to its bytes (through JSON, as ``crit decode | crit encode``), and ``pycriu inspect`` reads
the checkpoint. The lazy and page-server tests call them, so dumps of those flows are covered."""

from __future__ import annotations

import json
from pathlib import Path

from pycriu import images
from pycriu.images import magic
from pycriu.inspect import Inspection, inspect


def image_files(d: Path) -> list[Path]:
    """The entry images of ``d``: ``*.img`` and CRIU's stats, but for the raw ones (page
    contents, ``ip`` and ``iptables`` dumps, tmpfs tars); logs and a runtime's own files (runc's
    ``descriptors.json``) are not images."""
    return sorted(p for p in d.iterdir() if p.is_file() and not magic.is_raw(p.name)
                  and (p.name.endswith(".img") or p.name.startswith("stats-")))


def assert_round_trips(d: Path) -> set[str]:
    """Every image of ``d`` comes back byte for byte, plain and pretty; returns the types seen."""
    kinds = set()
    for path in image_files(d):
        raw = path.read_bytes()
        for pretty in (False, True):
            img = images.loads(raw, pretty=pretty)
            kinds.add(img["magic"])
            assert images.dumps(json.loads(json.dumps(img))) == raw, f"{path} (pretty={pretty})"
    return kinds


def lazy_and_present_pages(d: Path) -> tuple[int, int]:
    """(pages in the images, pages left lazy) over the whole tree, as ``inspect`` counts them."""
    seen: Inspection = inspect(d)
    maps = [m for p in seen.processes for m in p.mappings]
    return sum(m.pages_images for m in maps), sum(m.pages_lazy for m in maps)
