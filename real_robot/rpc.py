"""Request/reply over ZeroMQ with CURVE authentication: the transport under every bridge endpoint.

``RPCServer`` (a ROUTER socket) serves the policy server, the robot-side driver server and the e-stop
endpoint; ``RPCClient`` (a DEALER socket) is what ``RemotePolicy`` and ``RemoteDriver`` use.

Security defaults:

* CURVE authentication and encryption are on. The server only completes the handshake with clients
  whose public key is in its ``authorized_clients/`` directory (``auth.py``); a client without a key,
  or with an unknown key, never gets a single message through.
* The server binds ``127.0.0.1`` unless told otherwise, and refuses to serve a non-loopback address
  with authentication off.
* Every message is size-checked twice: by ZeroMQ (``MAXMSGSIZE``: a peer that sends a larger frame is
  disconnected) and by :func:`protocol.decode` (the whole message; answered with an ``oversized``
  error). Malformed messages get a ``malformed`` error reply; handler exceptions become error replies.
  Nothing a client sends stops the serving loop.

A request carries an ``id``; the client drops replies whose id is not the one it waits for (a late
reply to a timed-out request) and rebuilds its socket after a timeout, so a stale request queued in a
dead connection is never delivered later.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from embodied_distill.real_robot.protocol import (
    SUPPORTED_VERSIONS,
    VERSION,
    AuthenticationError,
    BridgeError,
    ErrorCode,
    Message,
    MessageLimits,
    MiB,
    ProtocolError,
    RequestTimeout,
    ServerUnavailable,
    decode,
    encode,
    error_reply,
    peek_id,
    raise_for_error,
    reply,
)

log = logging.getLogger(__name__)


def _require_zmq():
    try:
        import zmq
    except ImportError as e:  # pragma: no cover - pyzmq is a declared dependency
        raise ImportError("the robot bridge needs pyzmq: pip install 'pyzmq>=25'") from e
    return zmq


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _tcp_host(host: str) -> str:
    host = "127.0.0.1" if host == "localhost" else host.strip("[]")
    return f"[{host}]" if ":" in host else host


@dataclasses.dataclass
class ServerConfig:
    """Where and how a bridge server listens."""

    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default; "0.0.0.0" or a LAN address exposes the server (auth needed)."""
    port: int = 5555
    """TCP port (0: pick a free one; the bound address is in ``server.address``)."""
    auth: bool = True
    """CURVE authentication + encryption. Off is only allowed on a loopback host."""
    keys_dir: str | None = None
    """Key directory (``auth.py``); None: ``$EMBODIED_DISTILL_KEYS`` or ~/.config/embodied_distill/keys."""
    max_message_bytes: int = 16 * MiB
    """Largest accepted request (and reply), header plus arrays, in bytes (>= 1024)."""
    poll_interval_s: float = 0.05
    """How often the serving loop checks whether it was asked to stop (0 < s <= 1)."""

    def __post_init__(self):
        if not 0 <= int(self.port) <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if not 0 < self.poll_interval_s <= 1:
            raise ValueError(f"poll_interval_s must be in (0, 1], got {self.poll_interval_s}")
        if not self.auth and not is_loopback(self.host):
            raise ValueError(f"refusing to serve on {self.host!r} without authentication; keep auth=true "
                             "(the default) or bind a loopback address")


@dataclasses.dataclass
class ClientConfig:
    """How a client reaches a bridge server."""

    address: str = "tcp://127.0.0.1:5555"
    """Server endpoint, ``tcp://HOST:PORT``."""
    auth: bool = True
    """Use CURVE (must match the server)."""
    keys_dir: str | None = None
    """Key directory holding this client's keypair (``client.key_secret``); None: the default directory."""
    server_key: str | None = None
    """The server's public key file; None: ``<keys_dir>/server.key`` (a server on this machine)."""
    timeout_s: float = 2.0
    """Reply deadline of one request once connected (> 0)."""
    connect_timeout_s: float = 10.0
    """How long a request waits for a connection (TCP + CURVE handshake) before giving up (> 0)."""
    max_message_bytes: int = 16 * MiB
    """Largest request or reply this client handles, in bytes (>= 1024)."""

    def __post_init__(self):
        if not str(self.address).startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"address must look like tcp://HOST:PORT, got {self.address!r}")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeout_s and connect_timeout_s must be > 0")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")


Handler = Callable[[Message], Message]


class RPCServer:
    """Single-threaded ROUTER server: authenticates, size-checks, decodes, dispatches, always answers.

    Subclasses register handlers in ``self.handlers[type] = fn(Message) -> Message``. Handlers run one at
    a time in the serving thread, so they need no locks among themselves. ``ping`` is built in.

    Use ``start()`` (background thread, returns once bound) or ``serve_forever()`` (this thread).
    """

    name = "rpc"
    error_code = ErrorCode.INTERNAL
    """The code of the error reply when a handler raises (servers of policies / drivers override it)."""

    def __init__(self, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        self.limits = MessageLimits(max_message_bytes=self.config.max_message_bytes)
        self.handlers: dict[str, Handler] = {"ping": self._ping}
        self.address: str | None = None
        self.server_key_file: Path | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._started = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 30.0) -> RPCServer:
        """Serve in a daemon thread; returns once the socket is bound (raises what binding raised)."""
        self._thread = threading.Thread(target=self._run_thread, name=f"{self.name}-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"{self.name} server did not start within {timeout_s}s")
        if self._error is not None:
            raise self._error
        return self

    def _run_thread(self) -> None:
        try:
            self.serve_forever()
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def __enter__(self) -> RPCServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving
    def serve_forever(self, on_ready: Callable[[RPCServer], None] | None = None) -> None:
        """Bind and serve until ``stop()``; ``on_ready(self)`` runs once the socket is bound."""
        zmq = _require_zmq()
        from embodied_distill.real_robot.auth import ensure_keys, load_keypair

        cfg = self.config
        ctx = zmq.Context()
        authenticator = None
        sock = ctx.socket(zmq.ROUTER)
        try:
            sock.linger = 0
            sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
            sock.rcvhwm = sock.sndhwm = 64
            if cfg.auth:
                from zmq.auth.thread import ThreadAuthenticator

                paths = ensure_keys(cfg.keys_dir)
                authenticator = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
                authenticator.start()
                authenticator.configure_curve(domain="*", location=str(paths.authorized))
                public, secret = load_keypair(paths.server_secret)
                sock.curve_publickey, sock.curve_secretkey = public, secret
                sock.curve_server = True
                self.server_key_file = paths.server_public
            host = _tcp_host(cfg.host)
            if host.startswith("["):
                sock.ipv6 = True
            port = sock.bind_to_random_port(f"tcp://{host}") if int(cfg.port) == 0 else int(cfg.port)
            if int(cfg.port) != 0:
                sock.bind(f"tcp://{host}:{port}")
            self.address = f"tcp://{host}:{port}"
            self._started = time.monotonic()
            self._ready.set()
            if on_ready is not None:
                on_ready(self)
            while not self._stop.is_set():
                if not sock.poll(int(cfg.poll_interval_s * 1000)):
                    continue
                frames = sock.recv_multipart(copy=False)
                if len(frames) < 2:
                    continue
                identity, payload = frames[0].bytes, frames[1:]
                envelope: list[bytes] = []
                if len(payload) > 1 and len(payload[0]) == 0:  # a REQ client's empty delimiter
                    envelope, payload = [b""], payload[1:]
                out = self._encode_reply(self.handle(payload))
                try:
                    sock.send_multipart([identity, *envelope, *out], flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:  # the client is gone or not reading; never block the server on it
                    self.stats["dropped_replies"] += 1
        finally:
            sock.close(0)
            if authenticator is not None:
                authenticator.stop()
            ctx.term()
            self._ready.set()

    def handle(self, frames: list[Any]) -> Message:
        """One request's frames -> its reply; never raises."""
        try:
            msg = decode(frames, self.limits)
        except ProtocolError as e:
            self.stats["rejected"] += 1
            self.stats[f"rejected_{e.code.value}"] += 1
            return error_reply(peek_id(frames, self.limits), e.code, e.message,
                               supported_versions=list(SUPPORTED_VERSIONS))
        except Exception as e:  # decode bugs must not stop the server either
            self.stats["rejected"] += 1
            return error_reply(0, ErrorCode.MALFORMED, f"{type(e).__name__}: {e}")
        handler = self.handlers.get(msg.type)
        if handler is None:
            self.stats["rejected"] += 1
            self.stats[f"rejected_{ErrorCode.UNKNOWN_TYPE.value}"] += 1
            return error_reply(msg.id, ErrorCode.UNKNOWN_TYPE,
                               f"unknown message type {msg.type!r}; this {self.name} server handles "
                               f"{sorted(self.handlers)}")
        try:
            rep = handler(msg)
            self.stats["served"] += 1
            self.stats[f"served_{msg.type}"] += 1
            return rep
        except ProtocolError as e:
            self.stats["rejected"] += 1
            self.stats[f"rejected_{e.code.value}"] += 1
            return error_reply(msg.id, e.code, e.message)
        except Exception as e:
            self.stats["handler_errors"] += 1
            log.warning("%s handler %r raised:\n%s", self.name, msg.type, traceback.format_exc())
            return error_reply(msg.id, self.error_code, f"{type(e).__name__}: {e}")

    def _encode_reply(self, rep: Message) -> list[Any]:
        try:
            return encode(rep, self.limits)
        except ProtocolError as e:
            return encode(error_reply(rep.id, e.code, f"reply not sendable: {e.message}"), self.limits)
        except Exception as e:
            return encode(error_reply(rep.id, ErrorCode.INTERNAL,
                                      f"reply not encodable: {type(e).__name__}: {e}"), self.limits)

    def _ping(self, msg: Message) -> Message:
        return reply(msg, {"server": self.name, "protocol_version": VERSION, "time": time.monotonic(),
                           "uptime_s": time.monotonic() - self._started, "stats": dict(self.stats)})


class RPCClient:
    """Thread-safe request/reply client (one request at a time) for an ``RPCServer``.

    Raises :class:`ServerUnavailable` when no connection can be made, :class:`AuthenticationError` when
    the CURVE handshake is refused, :class:`RequestTimeout` when a reply is late, and
    :class:`RemoteError` (:class:`EStopError`) when the server answers with an error.
    """

    def __init__(self, config: ClientConfig | None = None):
        zmq = _require_zmq()
        self._zmq = zmq
        self.config = config or ClientConfig()
        self.limits = MessageLimits(max_message_bytes=self.config.max_message_bytes)
        self._keys: tuple[bytes, bytes, bytes] | None = None
        if self.config.auth:
            from embodied_distill.real_robot.auth import (
                KeyPaths,
                default_keys_dir,
                load_keypair,
                load_public_key,
            )

            paths = KeyPaths(Path(self.config.keys_dir).expanduser() if self.config.keys_dir
                             else default_keys_dir())
            public, secret = load_keypair(paths.client_secret)
            server_key = load_public_key(self.config.server_key or paths.server_public)
            self._keys = (public, secret, server_key)
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._next_id = 0
        self._connected_once = False
        self._sock = self._mon = None
        self._open()

    def _open(self) -> None:
        zmq = self._zmq
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.immediate = 1  # queue only on completed connections: a dead server fails fast, no stale queue
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.reconnect_ivl = 50
        sock.reconnect_ivl_max = 1000
        if self._keys is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self._keys
        events = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
            zmq.EVENT_HANDSHAKE_FAILED_AUTH
        self._mon = sock.get_monitor_socket(events)
        sock.connect(self.config.address)
        self._sock = sock

    def _close_sockets(self) -> None:
        if self._sock is not None:
            try:
                self._sock.disable_monitor()
            except Exception:
                pass
            self._sock.close(0)
        if self._mon is not None:
            self._mon.close(0)
        self._sock = self._mon = None

    def _handshake_failure(self) -> str | None:
        from zmq.utils.monitor import recv_monitor_message

        zmq, failures = self._zmq, []
        while self._mon is not None:
            try:
                event = recv_monitor_message(self._mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            failures.append(event)
        if not failures:
            return None
        last = failures[-1]
        kind = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the server refused this client's key",
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "security mechanism mismatch (auth on at one end only?)",
                }.get(last["event"], "the CURVE handshake failed (wrong server key, or auth off at one end?)")
        return f"{kind} ({len(failures)} failed handshakes with {self.config.address})"

    def call(self, type: str, body: Mapping[str, Any] | None = None,
             arrays: Mapping[str, np.ndarray] | None = None, timeout_s: float | None = None) -> Message:
        """Send one request and wait for its reply; raises on error replies (see class docstring)."""
        zmq = self._zmq
        with self._lock:
            if self._sock is None:
                raise BridgeError("client is closed")
            self._next_id = (self._next_id + 1) % (2**62)
            rid = self._next_id
            frames = encode(Message(type, rid, dict(body or {}), dict(arrays or {})), self.limits)
            timeout = self.config.timeout_s if timeout_s is None else timeout_s
            wait = self.config.connect_timeout_s if not self._connected_once else timeout
            if not self._sock.poll(int(wait * 1000), zmq.POLLOUT):
                failure = self._handshake_failure()
                if failure:
                    raise AuthenticationError(failure)
                raise ServerUnavailable(f"no connection to {self.config.address} within {wait:.2f}s "
                                        "(is the server running, and is the address right?)")
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                raise ServerUnavailable(f"connection to {self.config.address} dropped") from None
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._sock.poll(max(1, int(remaining * 1000)), zmq.POLLIN):
                    self._close_sockets()  # drop the stale request with its socket; reconnect fresh
                    self._open()
                    raise RequestTimeout(f"no reply to {type!r} from {self.config.address} "
                                         f"within {timeout:.3f}s")
                rep = decode(self._sock.recv_multipart(copy=False), self.limits)
                if rep.id == rid:
                    self._connected_once = True
                    return raise_for_error(rep)

    def close(self) -> None:
        with self._lock:
            self._close_sockets()
            self._ctx.term()

    def __enter__(self) -> RPCClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
