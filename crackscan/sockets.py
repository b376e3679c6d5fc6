"""ZeroMQ sockets, each described by one string ``PATTERN+ACTION:ENDPOINT``, parsed here only.

    push+bind:tcp://127.0.0.1:5555      pull+connect:ipc:///tmp/crackscan/frames

The pattern names which way a link's payload goes (``push``: frames or results leave here;
``pull``: they arrive here). Every link is a ZeroMQ ROUTER on its binding side and DEALERs on
its connecting sides, because every link carries replies: a worker's credit and heartbeats back
to acquisition on the frame link, management's ``stored`` reports back to acquisition on the
control link (see ``acquisition.dispatch``). So the binding side receives ``[peer, *frames]``
and addresses a peer with ``[peer, *frames]``; a connecting side sends and receives plain
``frames``. Acquisition binds the frame link and management the results link.

Security. Loopback TCP and ``ipc://`` endpoints are reachable only from the same host. Binding
any other interface needs CURVE keys (:class:`KeyRing`, made by ``crackscan keys``): the binding
side (acquisition's frames, management's results) is a CURVE server that accepts only clients
whose public key is in the ring's ``authorized/`` folder (checked by a ZAP authenticator thread);
the connecting side (inference workers, on any host) proves itself with its client key. A peer
without keys, or with keys not authorized, never gets a message through.
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from crackscan.errors import UserError

PATTERNS = ("push", "pull")
MAX_MESSAGE_BYTES = 256 << 20  # a larger message is refused by ZeroMQ before it is read


class SocketError(UserError, ValueError):
    """A socket spec or key folder that cannot be used; the message says what would work."""


@dataclass(frozen=True)
class SocketSpec:
    pattern: str
    bind: bool
    endpoint: str

    @classmethod
    def parse(cls, text: str, authenticated: bool = False) -> SocketSpec:
        """The spec of ``text``; a non-loopback TCP bind is refused unless ``authenticated``
        (the socket will be opened with CURVE keys)."""
        try:
            kind, endpoint = text.split(":", 1)
            pattern, action = kind.split("+", 1)
        except ValueError:
            raise SocketError(f"bad socket {text!r}: expected PATTERN+bind|connect:ENDPOINT, "
                             "e.g. push+bind:tcp://127.0.0.1:5555") from None
        if pattern not in PATTERNS:
            raise SocketError(f"bad socket {text!r}: pattern must be one of {sorted(PATTERNS)}")
        if action not in ("bind", "connect"):
            raise SocketError(f"bad socket {text!r}: action must be 'bind' or 'connect'")
        if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise SocketError(f"bad socket {text!r}: endpoint must be tcp://, ipc:// or inproc://")
        spec = cls(pattern, action == "bind", endpoint)
        if spec.bind and endpoint.startswith("tcp://"):
            host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
            if host != "localhost" and not _is_loopback(host) and not authenticated:
                raise SocketError(f"refusing to bind {endpoint}: only loopback or ipc:// endpoints "
                                 "may be bound without authentication; create keys with "
                                 "`crackscan keys --out DIR` and pass --keys DIR")
        return spec

    def __str__(self) -> str:
        return f"{self.pattern}+{'bind' if self.bind else 'connect'}:{self.endpoint}"

    def open(self, context: zmq.Context, hwm: int = 4, keys: KeyRing | None = None,
             routing_id: str | None = None) -> zmq.Socket:
        """A socket of this spec: a ROUTER when it binds, a DEALER when it connects (module
        docstring). ``hwm`` bounds the messages queued per peer: small values keep back-pressure
        tight. With ``keys`` the link is CURVE-encrypted and authenticated (close the context
        with :func:`terminate`). ``routing_id``: how the binding side addresses this
        connecting socket (a worker's name on the frame link)."""
        socket = context.socket(zmq.ROUTER if self.bind else zmq.DEALER)
        if routing_id is not None:
            socket.setsockopt(zmq.ROUTING_ID, routing_id.encode())
        socket.setsockopt(zmq.LINGER, 2000)
        socket.setsockopt(zmq.SNDHWM, hwm)
        socket.setsockopt(zmq.RCVHWM, hwm)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        if keys is not None:
            if self.bind:
                keys.serve(context, socket)
            else:
                keys.connect_as_client(socket)
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


# --- CURVE keys -------------------------------------------------------------------------------

_AUTHENTICATORS: dict[int, ThreadAuthenticator] = {}  # one ZAP handler per context


@dataclass(frozen=True)
class KeyRing:
    """A folder made by ``crackscan keys``::

        server.key  server.key_secret    the binding side's key pair
        client.key  client.key_secret    the connecting side's key pair
        authorized/*.key                 public keys of the clients a server accepts

    A worker host needs only ``client.key*`` and ``server.key``; the secret of the server stays
    on the hosts that bind (acquisition, management)."""

    directory: Path

    @classmethod
    def load(cls, directory: Path) -> KeyRing:
        ring = cls(Path(directory))
        if not (ring.directory / "server.key").is_file():
            raise SocketError(f"{directory} holds no CURVE keys (server.key); create them with "
                             "`crackscan keys --out DIR`")
        return ring

    def _pair(self, name: str) -> tuple[bytes, bytes]:
        path = self.directory / f"{name}.key_secret"
        if not path.is_file():
            raise SocketError(f"{path} is missing: this host cannot act as the CURVE {name}")
        public, secret = zmq.auth.load_certificate(path)
        return public, secret

    def serve(self, context: zmq.Context, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE server that accepts only authorized client keys."""
        authorized = self.directory / "authorized"
        if id(context) not in _AUTHENTICATORS:
            authenticator = ThreadAuthenticator(context)
            authenticator.start()
            authenticator.configure_curve(domain="*", location=str(authorized))
            _AUTHENTICATORS[id(context)] = authenticator
        public, secret = self._pair("server")
        socket.curve_secretkey, socket.curve_publickey = secret, public
        socket.curve_server = True

    def connect_as_client(self, socket: zmq.Socket) -> None:
        server_public, _ = zmq.auth.load_certificate(self.directory / "server.key")
        public, secret = self._pair("client")
        socket.curve_secretkey, socket.curve_publickey = secret, public
        socket.curve_serverkey = server_public


def create_keys(directory: Path, clients: tuple[str, ...] = ("client",)) -> list[Path]:
    """A new key ring in ``directory``: the server pair (made once), a pair per client name, each
    client's public key copied to ``authorized/``. Returns the files written."""
    directory = Path(directory)
    (directory / "authorized").mkdir(parents=True, exist_ok=True)
    written = []
    names = clients if (directory / "server.key_secret").is_file() else ("server", *clients)
    for name in names:
        if (directory / f"{name}.key_secret").exists():
            raise FileExistsError(f"{directory / name}.key_secret exists; choose another name "
                                  "or folder (keys are never overwritten)")
        public, secret = zmq.auth.create_certificates(directory, name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
        if name != "server":
            shutil.copy(public, directory / "authorized" / f"{name}.key")
    return written


def terminate(context: zmq.Context) -> None:
    """Stop the context's CURVE authenticator, if any, then terminate it (the authenticator's
    own socket would otherwise keep ``term`` waiting)."""
    authenticator = _AUTHENTICATORS.pop(id(context), None)
    if authenticator is not None:
        authenticator.stop()
    context.term()
