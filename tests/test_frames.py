"""Length-prefixed frames over a socket: reassembled in order from any split, corrupt lengths refused."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from policies.frames import MAX_FRAME, FrameReader, frame, read_frames, write_all


def test_frames_come_back_whole_and_in_order_from_any_split():
    payloads = [b"", b"a", b"hello" * 100, bytes(range(256))]
    stream = b"".join(frame(p) for p in payloads)
    for step in (1, 3, 7, len(stream)):
        reader, got = FrameReader(), []
        for at in range(0, len(stream), step):
            got += reader.feed(stream[at:at + step])
        assert got == payloads and reader.partial == 0


def test_a_corrupt_length_is_refused_not_waited_for():
    with pytest.raises(ValueError, match="corrupt frame stream"):
        FrameReader().feed((MAX_FRAME + 1).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="exceeds"):
        frame(b"x" * (MAX_FRAME + 1))


def test_read_frames_drains_a_non_blocking_socket_and_sees_eof():
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        reader = FrameReader()
        assert read_frames(b.fileno(), reader) == ([], False)  # nothing yet: no wait
        a.sendall(frame(b"one") + frame(b"two")[:3])
        assert read_frames(b.fileno(), reader) == ([b"one"], False)
        a.sendall(frame(b"two")[3:])
        a.shutdown(socket.SHUT_WR)
        got, eof = read_frames(b.fileno(), reader)
        if not eof:  # the close may arrive after the last bytes were read
            more, eof = read_frames(b.fileno(), reader)
            got += more
        assert got == [b"two"] and eof


def test_write_all_waits_for_a_full_peer_instead_of_losing_bytes():
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = os.urandom(1 << 20)  # far beyond the buffers: the writer must wait for the reader
        received = bytearray()

        def drain():
            b.settimeout(5)  # a writer that gave up early shows as a short read, not a hang
            while len(received) < len(data):
                received.extend(b.recv(1 << 16))

        t = threading.Thread(target=drain)
        t.start()
        write_all(a.fileno(), data)
        t.join(timeout=10)
        assert not t.is_alive() and bytes(received) == data
