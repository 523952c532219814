"""The agent protocol's file streaming, and the receiver's filesystem policy: allowed names, size
and space limits, ``O_EXCL|O_NOFOLLOW`` creation relative to directory fds, hard links on one
host with their checks, sparse page images."""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .channel import Channel
from .errors import NoSpaceError, ProtocolError
from .messages import IMAGE_NAME, check_image_name

# --- File streaming -----------------------------------------------------------------------------


@dataclass
class Limits:
    """What a receiver accepts in one session."""

    max_file_size: int = 64 << 30
    max_total_bytes: int = 256 << 30
    max_files: int = 100_000
    min_free_bytes: int = 64 << 20
    received_files: int = 0
    received_bytes: int = 0
    names: set[tuple[str, str]] = field(default_factory=set)
    linked: set[tuple[int, int]] = field(default_factory=set)  # (st_dev, st_ino) of hard-linked files
    linked_bytes: int = 0  # their sizes: counted in files-ok, not against max_total_bytes


def _check_ranges(ranges: Any, size: int) -> list[tuple[int, int]]:
    if not isinstance(ranges, list) or len(ranges) > 1_000_000:
        raise ProtocolError("file ranges must be a list")
    out: list[tuple[int, int]] = []
    end = 0
    for item in ranges:
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise ProtocolError("each file range must be [offset, length]")
        off, length = item
        if off < end or length <= 0 or off + length > size:
            raise ProtocolError("file ranges must be sorted, non-overlapping and inside the file")
        out.append((off, length))
        end = off + length
    return out


def send_file(channel: Channel, dir_name: str, path: str | os.PathLike[str], *,
              name: str | None = None, ranges: list[tuple[int, int]] | None = None,
              pattern: re.Pattern[str] = IMAGE_NAME, on_bytes: Callable[[int], None] | None = None) -> int:
    """Stream one regular file (or only ``ranges`` of it, as a sparse file); return payload bytes.

    The file is read in chunks straight from where CRIU wrote it: no temporary copy.
    """
    name = check_image_name(name or Path(path).name, pattern)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError(f"{path} is not a regular file")
        size = st.st_size
        spans = [(0, size)] if ranges is None else ranges
        msg: dict[str, Any] = {"type": "file", "dir": dir_name, "name": name, "size": size}
        if ranges is not None:
            msg["ranges"] = [[o, n] for o, n in ranges]
        channel.send(msg)
        sent = 0
        for off, length in spans:
            channel.send_file_data(fd, off, length, on_bytes=on_bytes)
            sent += length
        channel.stats.files_sent += 1
        return sent
    finally:
        os.close(fd)


def link_file(channel: Channel, dir_name: str, path: str | os.PathLike[str], *, name: str | None = None,
              pattern: re.Pattern[str] = IMAGE_NAME) -> int:
    """Hand one regular file to a peer on this host by name (``file-link``): it hard-links it
    into its directory, so nothing is copied and the page cache that holds it is shared.
    Returns the file's size."""
    name = check_image_name(name or Path(path).name, pattern)
    path = os.path.abspath(path)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(f"{path} is not a regular file")
    channel.send({"type": "file-link", "dir": dir_name, "name": name, "size": st.st_size, "path": path})
    channel.stats.files_sent += 1
    return st.st_size


def _claim(msg: Mapping[str, Any], limits: Limits, pattern: re.Pattern[str]) -> tuple[str, tuple[str, str]]:
    """The checked name of a file the peer sends (``file`` or ``file-link``), and its key: not
    sent before in this session, and within the session's file count."""
    name = check_image_name(msg["name"], pattern)
    key = (str(msg["dir"]), name)
    if key in limits.names:
        raise ProtocolError(f"file {name!r} was already sent")
    if limits.received_files + 1 > limits.max_files:
        raise ProtocolError(f"session exceeds its limit of {limits.max_files} files")
    return name, key


def _check_room(name: str, size: int, payload: int, limits: Limits, dir_fd: int) -> None:
    """Before ``payload`` bytes of a file of ``size`` bytes are written into ``dir_fd``: the size
    limits of one file and of the session, and the free space."""
    if size < 0 or size > limits.max_file_size:
        raise ProtocolError(f"file {name!r} of {size} bytes exceeds the limit of {limits.max_file_size}")
    if limits.received_bytes + payload > limits.max_total_bytes:
        raise ProtocolError(f"session exceeds its limit of {limits.max_total_bytes} bytes")
    vfs = os.statvfs(dir_fd)
    free = vfs.f_bavail * vfs.f_frsize
    if payload + limits.min_free_bytes > free:
        try:
            where = os.readlink(f"/proc/self/fd/{dir_fd}")
        except OSError:
            where = "the receiving directory"
        raise NoSpaceError(f"not enough free space for {name!r} in {where}: {payload} bytes needed (and "
                           f"{limits.min_free_bytes} kept free), {free} free",
                           hint="free space there, or give the agent a larger --root (the lazy flows' images go "
                                "to /dev/shm unless --images-on-disk)")


def _name_taken(name: str) -> ProtocolError:
    return ProtocolError(f"refused file name {name!r}: it already exists (or is a link)")


@contextmanager
def _new_file(name: str, dir_fd: int) -> Iterator[int]:
    """Create ``name`` in ``dir_fd`` with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (an existing file or
    symlink of that name is refused) and yield its descriptor; it is closed at the end of the
    block, and the file removed if the block failed."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except FileExistsError:
        raise _name_taken(name) from None
    except OSError as exc:
        raise ProtocolError(f"cannot create {name!r}: {exc.strerror}") from None
    ok = False
    try:
        yield fd
        ok = True
    finally:
        os.close(fd)
        if not ok:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass


def accept_link(msg: Mapping[str, Any], dir_fd: int, limits: Limits, *, pattern: re.Pattern[str] = IMAGE_NAME) -> int:
    """Take the file of one ``file-link`` message into ``dir_fd`` by hard link; return its size.

    Only an agent on the source's host accepts these (it is given ``--same-host``). The name is
    checked as for ``file``; the path must be absolute and name a regular file of the stated
    size, and what got linked must be that very file (a path swapped for a symbolic link in
    between is refused and the link removed). Where the kernel will not link it (another mount
    of the filesystem, a filesystem without hard links, a policy), the file is copied instead,
    by the kernel (``copy_file_range``), from the same checked file."""
    name, key = _claim(msg, limits, pattern)
    path, size = msg["path"], msg["size"]
    if not os.path.isabs(path):
        raise ProtocolError(f"file-link {name!r}: {path!r} is not an absolute path")
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ProtocolError(f"file-link {name!r}: {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise ProtocolError(f"file-link {name!r}: {path} is not a regular file of {size} bytes")
    try:
        os.link(path, name, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise _name_taken(name) from None
    except OSError:
        _copy_checked(path, st, name, dir_fd, limits)
    else:
        got = os.lstat(name, dir_fd=dir_fd)
        if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(got.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            raise ProtocolError(f"file-link {name!r}: {path} changed while it was linked")
        limits.linked.add((got.st_dev, got.st_ino))
        limits.linked_bytes += size
    limits.names.add(key)
    limits.received_files += 1
    return size


def _kernel_copy(src: int, dst: int, size: int, what: str) -> None:
    """Copy ``size`` bytes between two file descriptors inside the kernel: ``copy_file_range``
    (within a filesystem), else ``sendfile`` (across filesystems, where the first refuses)."""
    done = 0
    use_range = True
    while done < size:
        if use_range:
            try:
                n = os.copy_file_range(src, dst, size - done, done, done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_range = False
                continue
        else:
            os.lseek(dst, done, os.SEEK_SET)
            n = os.sendfile(dst, src, done, size - done)
        if n <= 0:
            raise ProtocolError(f"{what} shrank while it was copied")
        done += n


def _copy_checked(path: str, st: os.stat_result, name: str, dir_fd: int, limits: Limits) -> None:
    """The fallback of :func:`accept_link`: copy ``path`` (still the file ``st`` describes), with
    the checks of a received file."""
    size = st.st_size
    _check_room(name, size, size, limits, dir_fd)
    try:
        src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolError(f"file-link {name!r}: cannot open {path}: {exc.strerror}") from None
    try:
        now = os.fstat(src)
        if (now.st_dev, now.st_ino, now.st_size) != (st.st_dev, st.st_ino, st.st_size):
            raise ProtocolError(f"file-link {name!r}: {path} changed while it was copied")
        with _new_file(name, dir_fd) as dst:
            try:
                _kernel_copy(src, dst, size, f"file-link {name!r}: {path}")
            except OSError as exc:
                raise ProtocolError(f"file-link {name!r}: copying {path} failed: {exc.strerror}") from None
    finally:
        os.close(src)
    limits.received_bytes += size


def receive_file(channel: Channel, msg: Mapping[str, Any], dir_fd: int, limits: Limits, *,
                 pattern: re.Pattern[str] = IMAGE_NAME, timeout: float | None = -1.0) -> int:
    """Receive the data of one ``file`` message into ``dir_fd``; return the payload bytes.

    Validates the name, the size against ``limits`` and the free space, then creates the file
    with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (an existing file or symlink of that name is refused).
    On any error the partial file is removed and the error raised.
    """
    name, key = _claim(msg, limits, pattern)
    size = msg["size"]
    ranges = msg.get("ranges")
    spans = [(0, size)] if ranges is None else _check_ranges(ranges, size)
    payload = sum(n for _, n in spans)
    _check_room(name, size, payload, limits, dir_fd)
    with _new_file(name, dir_fd) as fd:
        limits.names.add(key)
        if ranges is not None:
            os.ftruncate(fd, size)  # sparse: the gaps stay holes and use no disk
        for off, length in spans:
            done = 0
            while done < length:
                try:
                    done += channel.recv_file_data(fd, off + done, length - done, timeout)
                except ProtocolError as exc:
                    if type(exc) is not ProtocolError:
                        raise
                    raise ProtocolError(f"file {name!r}: {exc.message}") from None
    limits.received_files += 1
    limits.received_bytes += payload
    channel.stats.files_received += 1
    return payload


def send_files(channel: Channel, dir_name: str, paths: Iterable[tuple[str, str | os.PathLike[str],
               list[tuple[int, int]] | None]], *, pattern: re.Pattern[str] = IMAGE_NAME,
               on_bytes: Callable[[int], None] | None = None,
               on_file: Callable[[str], None] | None = None, link: bool = False) -> tuple[int, int]:
    """Send ``(name, path, ranges)`` files then ``files-done``; wait for ``files-ok``.

    ``on_file(name)`` runs after each file was sent (it may send a control message). With
    ``link`` (a peer on this host and filesystem), whole files go by hard link, not by copy.
    Returns (files, bytes: payload sent, plus the sizes of linked files)."""
    count = total = 0
    for name, path, ranges in paths:
        if link and ranges is None:
            total += link_file(channel, dir_name, path, name=name, pattern=pattern)
        else:
            total += send_file(channel, dir_name, path, name=name, ranges=ranges, pattern=pattern,
                               on_bytes=on_bytes)
        count += 1
        if on_file is not None:
            on_file(name)
    channel.send({"type": "files-done", "dir": dir_name, "count": count, "bytes": total})
    reply = channel.recv("files-ok")
    if reply["count"] != count or reply["bytes"] != total:
        raise ProtocolError(f"the peer received {reply['count']} files / {reply['bytes']} bytes, "
                            f"sent {count} / {total}")
    return count, total
