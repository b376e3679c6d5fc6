"""ZeroMQ sockets, each described by one string ``PATTERN+ACTION:ENDPOINT``, parsed here only.

    push+bind:tcp://127.0.0.1:5555      pull+connect:ipc:///tmp/crackscan/frames

Patterns are chosen for what a link needs: PUSH/PULL with a small high-water mark gives
back-pressure (a replay never drops a frame: the reader waits) and fans frames out to N workers.
Non-loopback TCP binds are refused here; authenticated remote links come with CURVE keys.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import zmq

PATTERNS = {"push": zmq.PUSH, "pull": zmq.PULL}
MAX_MESSAGE_BYTES = 256 << 20  # a larger message is refused by ZeroMQ before it is read


@dataclass(frozen=True)
class SocketSpec:
    pattern: str
    bind: bool
    endpoint: str

    @classmethod
    def parse(cls, text: str) -> SocketSpec:
        try:
            kind, endpoint = text.split(":", 1)
            pattern, action = kind.split("+", 1)
        except ValueError:
            raise ValueError(f"bad socket {text!r}: expected PATTERN+bind|connect:ENDPOINT, "
                             "e.g. push+bind:tcp://127.0.0.1:5555") from None
        if pattern not in PATTERNS:
            raise ValueError(f"bad socket {text!r}: pattern must be one of {sorted(PATTERNS)}")
        if action not in ("bind", "connect"):
            raise ValueError(f"bad socket {text!r}: action must be 'bind' or 'connect'")
        if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"bad socket {text!r}: endpoint must be tcp://, ipc:// or inproc://")
        spec = cls(pattern, action == "bind", endpoint)
        if spec.bind and endpoint.startswith("tcp://"):
            host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
            if host != "localhost" and not _is_loopback(host):
                raise ValueError(f"refusing to bind {endpoint}: only loopback or ipc:// endpoints "
                                 "may be bound without authentication")
        return spec

    def __str__(self) -> str:
        return f"{self.pattern}+{'bind' if self.bind else 'connect'}:{self.endpoint}"

    def open(self, context: zmq.Context, hwm: int = 4) -> zmq.Socket:
        """A socket of this spec. ``hwm`` bounds the messages queued per peer: small values keep
        back-pressure tight and latency low."""
        socket = context.socket(PATTERNS[self.pattern])
        socket.setsockopt(zmq.LINGER, 2000)
        socket.setsockopt(zmq.SNDHWM, hwm)
        socket.setsockopt(zmq.RCVHWM, hwm)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        if self.bind:
            socket.bind(self.endpoint)
        else:
            socket.connect(self.endpoint)
        return socket


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
