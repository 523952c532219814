"""The agent protocol without CRIU (no root): destinations, frames, schemas, the shared-secret
handshake and per-frame MACs, image names, sparse files, pagemap ranges and the report."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from pycriu import InvalidOptionError, MigrationReport
from pycriu.migration import AgentError, AuthenticationError, ProtocolError, TransportError
from pycriu.migration.images import PAGE_SIZE, PE_LAZY, PE_PRESENT, Pagemap, PagemapEntry, non_lazy_ranges
from pycriu.migration.protocol import (
    KIND_CONTROL,
    Channel,
    Limits,
    agent_authenticate,
    check_image_name,
    client_authenticate,
    decode,
    receive_file,
    send_file,
    validate,
)
from pycriu.migration.report import Phase
from pycriu.migration.transport import Destination, PipeStream, SocketStream


@pytest.mark.parametrize(("text", "expected"), [
    ("local", Destination("local")),
    ("ssh://host", Destination("ssh", "host")),
    ("ssh://me@host:2222", Destination("ssh", "host", 2222, "me")),
    ("ssh://[::1]:22", Destination("ssh", "::1", 22)),
    ("tcp://10.0.0.2:7000", Destination("tcp", "10.0.0.2", 7000)),
])
def test_destinations_parse(text: str, expected: Destination) -> None:
    d = Destination.parse(text)
    assert d == expected
    assert Destination.parse(str(d)) == d


@pytest.mark.parametrize("text", ["", "remote", "http://h", "tcp://h", "tcp://u@h:1", "ssh://", "ssh://u:pw@h",
                                  "ssh://h/path", "tcp://h:99999", "ssh://h?x=1"])
def test_bad_destinations_are_refused(text: str) -> None:
    with pytest.raises(InvalidOptionError):
        Destination.parse(text)


def _pair(**kw: Any) -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return Channel(SocketStream(a), role="client", timeout=5, **kw), Channel(SocketStream(b), role="agent", timeout=5)


def test_control_messages_round_trip() -> None:
    client, agent = _pair()
    client.send({"type": "ping", "t": 1.5})
    assert agent.recv("ping") == {"type": "ping", "t": 1.5}
    agent.send({"type": "pong", "t": 1.5})
    assert client.recv("pong")["t"] == 1.5
    assert client.stats.control_sent == agent.stats.control_received > 0


def test_the_sender_checks_its_own_messages() -> None:
    client, _ = _pair()
    with pytest.raises(ProtocolError):
        client.send({"type": "restored", "pid": 1})  # an agent message
    with pytest.raises(ProtocolError):
        client.send({"type": "ping"})  # missing field


@pytest.mark.parametrize("payload", [b'{"type":"ping","t":1,"t":2}', b'{"type":"ping","t":Infinity}',
                                     b'{"type":"ping","t":true}', b"[]", b'{"type":1}', b"\x00"])
def test_malformed_json_is_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        validate(decode(payload), sender="client")


def test_an_agent_error_becomes_an_exception() -> None:
    client, agent = _pair()
    agent.send({"type": "error", "code": "restore-failed", "message": "boom"})
    with pytest.raises(AgentError, match="boom") as info:
        client.recv("restored")
    assert info.value.code == "restore-failed"


def test_a_silent_peer_times_out() -> None:
    client, _ = _pair()
    with pytest.raises(TransportError, match="timed out"):
        client.recv(timeout=0.2)
    assert client.closed  # a stream that timed out mid-frame is unusable


def _handshake(client_secret: bytes | None, agent_secret: bytes | None, *, require: bool = True
               ) -> tuple[Channel, Channel, dict[str, BaseException]]:
    client, agent = _pair()
    errors: dict[str, BaseException] = {}

    def serve() -> None:
        try:
            agent_authenticate(agent, agent_secret, "test agent", failure_delay=0)
        except BaseException as exc:  # noqa: BLE001
            errors["agent"] = exc

    t = threading.Thread(target=serve)
    t.start()
    try:
        client_authenticate(client, client_secret, require=require)
    except BaseException as exc:  # noqa: BLE001
        errors["client"] = exc
        client.close()  # as the transport does: the agent sees the peer leave
    t.join(10)
    return client, agent, errors


def test_the_shared_secret_handshake_then_macs_every_frame() -> None:
    client, agent, errors = _handshake(b"k" * 32, b"k" * 32)
    assert not errors
    assert client.authenticated_frames and agent.authenticated_frames
    client.send({"type": "ping", "t": 2.0})
    assert agent.recv("ping")["t"] == 2.0


def test_a_wrong_secret_fails_on_both_sides() -> None:
    _, _, errors = _handshake(b"a" * 32, b"b" * 32)
    assert isinstance(errors["agent"], AuthenticationError)
    assert isinstance(errors["client"], AuthenticationError)


def test_a_client_demanding_authentication_refuses_an_agent_without() -> None:
    _, _, errors = _handshake(b"a" * 32, None, require=True)
    assert isinstance(errors["client"], AuthenticationError)


def test_a_missing_secret_is_reported() -> None:
    _, _, errors = _handshake(None, b"a" * 32)
    assert "requires a shared secret" in str(errors["client"])


def _tampered(mutate: Any) -> BaseException:
    client, agent, errors = _handshake(b"k" * 32, b"k" * 32)
    assert not errors
    raw = []
    real_write = client.stream.write
    client.stream.write = lambda data: raw.append(bytes(data))  # type: ignore[method-assign]
    client.send({"type": "ping", "t": 1.0})
    client.send({"type": "ping", "t": 2.0})
    for frame in mutate(raw):
        real_write(frame)
    with pytest.raises(AuthenticationError) as info:
        agent.recv()
        agent.recv()
    return info.value


def test_a_forged_frame_is_detected() -> None:
    def flip(frames: list[bytes]) -> list[bytes]:
        first = bytearray(frames[0])
        first[10] ^= 1
        return [bytes(first)]

    assert "frame authentication failed" in str(_tampered(flip))


def test_a_replayed_frame_is_detected() -> None:
    assert "frame authentication failed" in str(_tampered(lambda frames: [frames[0], frames[0]]))


def test_reordered_frames_are_detected() -> None:
    assert "frame authentication failed" in str(_tampered(lambda frames: [frames[1], frames[0]]))


@pytest.mark.parametrize("name", ["inventory.img", "core-1.img", "pages-65537.img", "pagemap-shmem-12345.img",
                                  "tmpfs-dev-42.tar.gz.img", "ip6tables-9.img", "fdinfo-2.img", "stats-dump.img",
                                  "ghost-file-1a2b.img", "netns-ct-7.img"])
def test_real_criu_image_names_are_accepted(name: str) -> None:
    assert check_image_name(name) == name


@pytest.mark.parametrize("name", ["../x.img", "/etc/passwd", "a/b.img", "..", "x.img/", "", "parent", ".x.img",
                                  "A.img", "x..img", "x.img.", " x.img", "x\x00.img", 7, None])
def test_hostile_names_are_refused(name: Any) -> None:
    with pytest.raises(ProtocolError):
        check_image_name(name)


def test_a_sparse_file_travels_as_its_data_ranges_only(tmp_path: Path) -> None:
    src = tmp_path / "pages-1.img"
    src.write_bytes(os.urandom(16 * PAGE_SIZE))
    out = tmp_path / "out"
    out.mkdir()
    client, agent = _pair()
    ranges = [(0, PAGE_SIZE), (8 * PAGE_SIZE, 2 * PAGE_SIZE)]
    sent = send_file(client, "images", src, ranges=ranges)
    assert sent == 3 * PAGE_SIZE
    msg = agent.recv("file")
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert receive_file(agent, msg, fd, Limits(min_free_bytes=0)) == 3 * PAGE_SIZE
    finally:
        os.close(fd)
    got, want = (out / "pages-1.img").read_bytes(), src.read_bytes()
    assert len(got) == len(want)
    for off, n in ranges:
        assert got[off:off + n] == want[off:off + n]
    assert got[PAGE_SIZE:8 * PAGE_SIZE] == bytes(7 * PAGE_SIZE)  # a hole
    assert (out / "pages-1.img").stat().st_blocks * 512 < len(want)


def test_non_lazy_ranges_follow_the_pagemap() -> None:
    pm = Pagemap("pagemap-1.img", 1, (
        PagemapEntry(0x1000, 2, PE_PRESENT),            # stack: read at restore
        PagemapEntry(0x9000, 10, PE_PRESENT | PE_LAZY),  # anonymous: lazy
        PagemapEntry(0x20000, 1, PE_PRESENT),
        PagemapEntry(0x21000, 3, PE_PRESENT),            # adjacent: merged
        PagemapEntry(0x30000, 5, 1),                     # in parent: not in this file
    ))
    assert non_lazy_ranges(pm) == [(0, 2 * PAGE_SIZE), (12 * PAGE_SIZE, 4 * PAGE_SIZE)]
    assert pm.count(lazy=True) == 10


def test_the_report_is_json_and_readable() -> None:
    r = MigrationReport(mode="lazy", requested_mode="auto", destination="local", transport="local", pid=42,
                        outcome="migrated", downtime=0.123, phases=[Phase("checks", 0.2), Phase("restore", 0.05)],
                        bytes={"control": 100, "images": 2 << 20, "page_server": 40 << 20},
                        destination_pid=77, source_state="gone", destination_state="running")
    again = MigrationReport.from_json(r.to_json())
    assert again == r and again.phases[0] == Phase("checks", 0.2)
    text = str(r)
    assert "downtime:        123 ms" in text and "pid 77" in text and "40.0 MiB" in text
    assert r.phase("restore") == 0.05 and r.phase("nope") is None and r.ok


def test_frames_have_a_size_limit() -> None:
    client, agent = _pair()
    client.stream.write(bytes([KIND_CONTROL]) + (2 << 20).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="exceeds"):
        agent.recv()


def _pipe_pair(**kw: Any) -> tuple[Channel, Channel]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    return (Channel(PipeStream(r2, w1), role="client", timeout=5, **kw),
            Channel(PipeStream(r1, w2), role="agent", timeout=5))


def test_file_data_moves_zero_copy_over_pipes_and_arrives_intact(tmp_path: Path) -> None:
    client, agent = _pipe_pair()
    assert client.zero_copy and agent.zero_copy
    data = os.urandom((3 << 20) + 12345)  # several frames, the last one partial
    src = tmp_path / "pages-1.img"
    src.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    got: list[int] = []
    try:
        t = threading.Thread(target=lambda: got.append(
            receive_file(agent, agent.recv("file"), fd, Limits(min_free_bytes=0))))
        t.start()
        assert send_file(client, "images", src) == len(data)
        t.join(10)
    finally:
        os.close(fd)
    assert got == [len(data)]
    assert (out / "pages-1.img").read_bytes() == data
    assert client.stats.data_sent == agent.stats.data_received == len(data) + 5 * 4  # headers only added


def test_macd_frames_never_take_the_zero_copy_path() -> None:
    client, _agent = _pipe_pair()
    client.enable_mac(b"k" * 32)
    assert not client.zero_copy


def test_zero_copy_refuses_more_data_than_announced_before_writing(tmp_path: Path) -> None:
    client, agent = _pipe_pair()
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        client.send({"type": "file", "dir": "images", "name": "core-1.img", "size": 4})
        client.send_data(b"12345")
        with pytest.raises(ProtocolError, match="more data than announced"):
            receive_file(agent, agent.recv("file"), fd, Limits(min_free_bytes=0))
    finally:
        os.close(fd)
    assert not (out / "core-1.img").exists()
