"""Build step of :mod:`pycriu.images`: CRIU's image schemas, taken from the CRIU source.

Two files are written to ``pycriu/images/_generated/``:

- ``criu.binpb``: a ``FileDescriptorSet`` that ``protoc`` compiles from every ``images/*.proto``
  of CRIU's source (imports included). :mod:`pycriu.images.schema` builds message classes from it
  in a private descriptor pool, so that CRIU's own Python module can be loaded beside ours.
- ``magic.json``: every ``NAME_MAGIC`` of ``criu/include/magic.h``, resolved to its number
  (aliases such as ``PAGES_MAGIC RAW_IMAGE_MAGIC`` followed), in the header's order.

The source is ``$PYCRIU_CRIU_SRC``, else the newest ``criu-*`` under ``/var/cache/pycriu/build``
(what ``scripts/provision.sh`` unpacks). Run by ``setup.py`` on every build; also runnable alone
(``python csrc/build_images.py``). When no source is found and both files exist already, they
are kept (a build from an sdist that carries them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "pycriu" / "images" / "_generated"
CACHE = Path("/var/cache/pycriu/build")
_DEFINE = re.compile(r"^#define\s+(\w+)\s+(\w+)")


def criu_source() -> Path | None:
    env = os.environ.get("PYCRIU_CRIU_SRC")
    if env:
        return Path(env)
    found = sorted(CACHE.glob("criu-*/images"), key=lambda p: p.parent.name)
    return found[-1].parent if found else None


def magics(header: Path) -> dict[str, int]:
    """``NAME_MAGIC -> value`` of ``magic.h`` (``#define A B`` where B is a number or another name)."""
    raw: dict[str, str] = {}
    for line in header.read_text().splitlines():
        m = _DEFINE.match(line)
        if m:
            raw[m.group(1)] = m.group(2)

    def value(name: str, depth: int = 0) -> int | None:
        v = raw.get(name)
        if v is None or depth > 8:
            return None
        if re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", v):
            return int(v, 0)
        return value(v, depth + 1)

    out = {}
    for name in raw:
        v = value(name)
        if v is not None and (name.endswith("_MAGIC") or name.startswith("CRTOOLS_IMAGES")):
            out[name] = v
    return out


def build(source: Path, out: Path = OUT) -> None:
    protos = sorted((source / "images").glob("*.proto"))
    if not protos:
        raise SystemExit(f"build_images: no images/*.proto in {source}")
    protoc = shutil.which("protoc")
    if protoc is None:
        raise SystemExit("build_images: protoc not found (Debian: apt-get install protobuf-compiler; "
                         "scripts/provision.sh installs it)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "criu.binpb.tmp"
    subprocess.run([protoc, f"-I{source / 'images'}", "--include_imports", f"--descriptor_set_out={tmp}",
                    *(p.name for p in protos)], check=True, cwd=source / "images")
    tmp.replace(out / "criu.binpb")
    table = magics(source / "criu" / "include" / "magic.h")
    (out / "magic.json").write_text(json.dumps(table, indent=0) + "\n")
    (out / "SOURCE").write_text(f"{source.name}\n")


def main() -> int:
    source = criu_source()
    if source is None or not (source / "images").is_dir():
        if (OUT / "criu.binpb").is_file() and (OUT / "magic.json").is_file():
            return 0
        print("build_images: no CRIU source: set PYCRIU_CRIU_SRC to an unpacked CRIU source tree "
              "(scripts/provision.sh unpacks one under /var/cache/pycriu/build)", file=sys.stderr)
        return 1
    build(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
