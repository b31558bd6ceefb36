"""Length-prefixed frames over a byte stream (the policy process's socket), written and read
without a helper thread.

    frame(payload) -> bytes            4-byte little-endian length, then the payload
    FrameReader().feed(data) -> [payloads]   whatever complete frames `data` finished
    read_frames(fd, reader) -> ([payloads], eof)   drain a non-blocking fd
    write_all(fd, data)                until every byte is written (waits while the peer is full)

Why not `multiprocessing.Connection.send_bytes` / `recv_bytes`: they block. The decode thread
publishes an event per layer and must never wait on the child, and a writer thread to hide
that costs the decode loop a GIL hand-off per event, which on an H100 host made the event
reach the child up to a switch interval (0.2 ms) late. Here the publisher writes the frame to
a non-blocking socket itself (a few microseconds) and the reader takes what has arrived.
"""
from __future__ import annotations

import os
import select
import struct

_HEAD = struct.Struct("<I")
MAX_FRAME = 64 << 20  # a frame this large is a corrupt stream, not a message


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _HEAD.pack(len(payload)) + payload


class FrameReader:
    """Reassembles frames from chunks of a stream, in order."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out, at, buf = [], 0, self._buf
        while len(buf) - at >= _HEAD.size:
            (n,) = _HEAD.unpack_from(buf, at)
            if n > MAX_FRAME:
                raise ValueError(f"corrupt frame stream: a frame claims {n} bytes (at most {MAX_FRAME})")
            if len(buf) - at - _HEAD.size < n:
                break
            out.append(bytes(buf[at + _HEAD.size: at + _HEAD.size + n]))
            at += _HEAD.size + n
        if at:
            del buf[:at]
        return out

    @property
    def partial(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._buf)


def read_frames(fd: int, reader: FrameReader, chunk: int = 1 << 16) -> tuple[list[bytes], bool]:
    """Every complete frame readable now from non-blocking `fd`; eof True once the peer closed."""
    out: list[bytes] = []
    while True:
        try:
            data = os.read(fd, chunk)
        except BlockingIOError:
            return out, False
        except ConnectionResetError:
            return out, True
        if not data:
            return out, True
        out += reader.feed(data)
        if len(data) < chunk:
            return out, False


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd`, waiting while the peer's buffer is full (the child's
    plans: a slow parent may hold up the policy process, never the other way round)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


__all__ = ["FrameReader", "MAX_FRAME", "frame", "read_frames", "write_all"]
