"""Wire format of the bridge: versioned messages, numpy arrays without pickle, hard size limits.

One message is one ZeroMQ multipart message::

    frame 0      UTF-8 JSON header, at most ``MessageLimits.max_header_bytes``:
                 {"proto": "embodied-distill-bridge", "v": 1, "type": "predict_chunk", "id": 17,
                  "body": {...JSON values...},
                  "arrays": [{"name": "state", "dtype": "<f4", "shape": [1, 2, 42]}, ...]}
    frame 1..N   the raw bytes of each array named in the header, in header order (C order)

Nothing is ever unpickled. An array is rebuilt with ``np.frombuffer`` from a dtype on a short allow-list
(bool, 1-8 byte signed/unsigned integers, 2-8 byte floats, all little-endian) and a shape whose byte
count must equal the frame's length exactly. Every limit is checked before anything is allocated, and
any violation raises :class:`ProtocolError` with a machine-readable ``code`` (see :class:`ErrorCode`),
which servers send back as an ``"error"`` reply instead of crashing.

Versioning: ``v`` is the protocol's major version; a peer refuses other majors with
``ErrorCode.VERSION`` and names the versions it speaks. New optional ``body`` fields are
backwards compatible (readers ignore unknown fields); anything else bumps ``VERSION``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PROTOCOL_NAME = "embodied-distill-bridge"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

# little-endian only: a big-endian array is converted on encode, never trusted on decode
ALLOWED_DTYPES = frozenset({"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8",
                            "<f2", "<f4", "<f8"})

MiB = 1 << 20


class ErrorCode(str, enum.Enum):
    """Why a request was refused; sent in the ``code`` field of an ``"error"`` reply."""

    MALFORMED = "malformed"          # not a valid message (bad JSON, bad header, frame/shape mismatch)
    OVERSIZED = "oversized"          # over a size limit
    VERSION = "version"              # protocol major version not spoken by the peer
    UNKNOWN_TYPE = "unknown_type"    # no handler for this message type
    BAD_REQUEST = "bad_request"      # well-formed but wrong for this endpoint (missing key, bad shape)
    POLICY_ERROR = "policy_error"    # the policy raised while serving the request
    DRIVER_ERROR = "driver_error"    # the robot driver raised while serving the request
    ESTOPPED = "estopped"            # the server is e-stopped; release it explicitly first
    BUSY = "busy"                    # a stateful resource is owned by another session
    STALE = "stale"                  # a command that refers to a too-old observation
    INTERNAL = "internal"            # a bug on the server side; the server keeps serving


class BridgeError(RuntimeError):
    """Base class of every error raised by the bridge's networking."""


class ProtocolError(BridgeError):
    """A message violates the wire format or a limit; ``code`` says which rule."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"[{code.value}] {message}")
        self.code = code
        self.message = message


class RemoteError(BridgeError):
    """The peer answered with an ``"error"`` reply."""

    def __init__(self, code: str, message: str, body: Mapping[str, Any] | None = None):
        super().__init__(f"remote error [{code}]: {message}")
        self.code = code
        self.message = message
        self.body = dict(body or {})


class EStopError(RemoteError):
    """The peer is e-stopped (``ErrorCode.ESTOPPED``)."""


class ServerUnavailable(BridgeError, ConnectionError):
    """No connection to the server could be made (nothing listening, or the link is down)."""


class AuthenticationError(BridgeError, PermissionError):
    """The CURVE handshake failed: the server does not know this client's key, or the keys mismatch."""


class RequestTimeout(BridgeError, TimeoutError):
    """A request was sent but no reply arrived in time."""


@dataclasses.dataclass(frozen=True)
class MessageLimits:
    """Hard limits checked on every message, sent or received."""

    max_message_bytes: int = 16 * MiB
    """Largest message (header + all array frames) in bytes; 16 MiB fits a batch of camera frames."""
    max_header_bytes: int = 64 * 1024
    """Largest JSON header frame in bytes."""
    max_arrays: int = 32
    """Most arrays in one message."""
    max_ndim: int = 8
    """Most dimensions of one array."""
    max_name_chars: int = 128
    """Longest array name."""

    def __post_init__(self):
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if not 256 <= self.max_header_bytes <= self.max_message_bytes:
            raise ValueError(f"max_header_bytes must be in [256, max_message_bytes], "
                             f"got {self.max_header_bytes}")
        if self.max_arrays < 0 or self.max_ndim < 0 or self.max_name_chars < 1:
            raise ValueError("max_arrays and max_ndim must be >= 0 and max_name_chars >= 1")


DEFAULT_LIMITS = MessageLimits()


@dataclasses.dataclass
class Message:
    """A decoded message: ``type`` (what to do), ``id`` (matches a reply to its request), a JSON ``body``
    and named numpy ``arrays``."""

    type: str
    id: int = 0
    body: dict[str, Any] = dataclasses.field(default_factory=dict)
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    version: int = VERSION


def reply(request: Message, body: Mapping[str, Any] | None = None,
          arrays: Mapping[str, np.ndarray] | None = None) -> Message:
    """The success reply to ``request``."""
    return Message("reply", request.id, dict(body or {}), dict(arrays or {}))


def error_reply(request_id: int, code: ErrorCode, message: str, **extra: Any) -> Message:
    """An ``"error"`` reply; ``message`` is cut to 1000 characters."""
    return Message("error", request_id, {"code": code.value, "message": str(message)[:1000], **extra})


def raise_for_error(msg: Message) -> Message:
    """``msg``, unless it is an error reply: that is raised (RemoteError; EStopError when e-stopped)."""
    if msg.type != "error":
        return msg
    code = str(msg.body.get("code", "unknown"))
    cls = EStopError if code == ErrorCode.ESTOPPED.value else RemoteError
    raise cls(code, str(msg.body.get("message", "")), msg.body)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) and obj.size <= 64:
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable; send arrays in Message.arrays")


def _wire_array(name: str, value: Any, limits: MessageLimits) -> np.ndarray:
    """Contiguous little-endian copy (or view) of ``value``; refuses object, string and complex dtypes."""
    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"array {name!r} has dtype {arr.dtype}; only bool, "
                                                   "integer and float arrays travel (no pickle)")
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"array {name!r} has dtype {arr.dtype.str}, not in "
                                                   f"{sorted(ALLOWED_DTYPES)}")
    if arr.ndim > limits.max_ndim:
        raise ProtocolError(ErrorCode.OVERSIZED, f"array {name!r} has {arr.ndim} dims > {limits.max_ndim}")
    return arr


def encode(msg: Message, limits: MessageLimits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """``Message`` -> list of frames (header first). Raises ProtocolError when a limit would be broken,
    so a sender learns about it before the peer has to refuse it."""
    if len(msg.arrays) > limits.max_arrays:
        raise ProtocolError(ErrorCode.OVERSIZED, f"{len(msg.arrays)} arrays > max_arrays={limits.max_arrays}")
    arrays = [(str(k), _wire_array(str(k), v, limits)) for k, v in msg.arrays.items()]
    header = {"proto": PROTOCOL_NAME, "v": int(msg.version), "type": str(msg.type), "id": int(msg.id),
              "body": msg.body,
              "arrays": [{"name": k, "dtype": a.dtype.str, "shape": list(a.shape)} for k, a in arrays]}
    head = json.dumps(header, separators=(",", ":"), default=_json_default).encode()
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(ErrorCode.OVERSIZED, f"header is {len(head)} B > max_header_bytes="
                                                 f"{limits.max_header_bytes}")
    total = len(head) + sum(a.nbytes for _, a in arrays)
    if total > limits.max_message_bytes:
        raise ProtocolError(ErrorCode.OVERSIZED, f"message is {total} B > max_message_bytes="
                                                 f"{limits.max_message_bytes}")
    return [head, *(memoryview(a).cast("B") if a.nbytes else b"" for _, a in arrays)]


def _frame_bytes(frame: Any) -> memoryview:
    """A read-only byte view of a zmq.Frame, bytes or memoryview."""
    buf = getattr(frame, "buffer", frame)  # zmq.Frame (copy=False) exposes .buffer
    view = memoryview(buf)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def peek_id(frames: Sequence[Any], limits: MessageLimits = DEFAULT_LIMITS) -> int:
    """Best-effort request id of a (possibly malformed) message, so an error reply can be matched."""
    try:
        head = _frame_bytes(frames[0])
        if len(head) > limits.max_header_bytes:
            return 0
        value = json.loads(bytes(head)).get("id", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0
    except Exception:
        return 0


def decode(frames: Sequence[Any], limits: MessageLimits = DEFAULT_LIMITS, copy: bool = True) -> Message:
    """Frames -> ``Message``; raises ProtocolError (MALFORMED, OVERSIZED, VERSION) on anything off.

    Args:
        frames: the multipart message (bytes, memoryviews or ``zmq.Frame``), header first.
        limits: the limits to enforce.
        copy: copy arrays out of the frames (writable arrays that outlive the frames).
    """
    if not frames:
        raise ProtocolError(ErrorCode.MALFORMED, "empty message")
    views = [_frame_bytes(f) for f in frames]
    total = sum(len(v) for v in views)
    if total > limits.max_message_bytes:
        raise ProtocolError(ErrorCode.OVERSIZED, f"message is {total} B > max_message_bytes="
                                                 f"{limits.max_message_bytes}")
    if len(views[0]) > limits.max_header_bytes:
        raise ProtocolError(ErrorCode.OVERSIZED, f"header is {len(views[0])} B > max_header_bytes="
                                                 f"{limits.max_header_bytes}")
    if len(views) - 1 > limits.max_arrays:
        raise ProtocolError(ErrorCode.OVERSIZED, f"{len(views) - 1} array frames > max_arrays="
                                                 f"{limits.max_arrays}")
    try:
        header = json.loads(bytes(views[0]).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(ErrorCode.MALFORMED, f"header is not UTF-8 JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "header must be a JSON object")
    if header.get("proto") != PROTOCOL_NAME:
        raise ProtocolError(ErrorCode.MALFORMED, f"header.proto must be {PROTOCOL_NAME!r}")
    version = header.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(ErrorCode.MALFORMED, "header.v must be an integer")
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(ErrorCode.VERSION, f"protocol version {version} not supported; this peer speaks "
                                               f"{list(SUPPORTED_VERSIONS)}")
    mtype, mid, body, specs = header.get("type"), header.get("id", 0), header.get("body", {}), \
        header.get("arrays", [])
    if not isinstance(mtype, str) or not 0 < len(mtype) <= 64:
        raise ProtocolError(ErrorCode.MALFORMED, "header.type must be a string of 1-64 characters")
    if not isinstance(mid, int) or isinstance(mid, bool) or not 0 <= mid < 2**63:
        raise ProtocolError(ErrorCode.MALFORMED, "header.id must be a non-negative 64-bit integer")
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "header.body must be a JSON object")
    if not isinstance(specs, list) or len(specs) != len(views) - 1:
        raise ProtocolError(ErrorCode.MALFORMED, f"header.arrays must list one spec per array frame "
                                                 f"({len(views) - 1} frames)")
    arrays: dict[str, np.ndarray] = {}
    for spec, view in zip(specs, views[1:]):
        arrays_name, arr = _decode_array(spec, view, limits, copy)
        if arrays_name in arrays:
            raise ProtocolError(ErrorCode.MALFORMED, f"array name {arrays_name!r} appears twice")
        arrays[arrays_name] = arr
    return Message(mtype, mid, body, arrays, version)


def _decode_array(spec: Any, view: memoryview, limits: MessageLimits, copy: bool) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "each array spec must be an object")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or not 0 < len(name) <= limits.max_name_chars:
        raise ProtocolError(ErrorCode.MALFORMED,
                            f"array name must be a string of 1-{limits.max_name_chars} chars")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise ProtocolError(ErrorCode.MALFORMED, f"array {name!r}: dtype {dtype!r} not in the allow-list")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise ProtocolError(ErrorCode.MALFORMED, f"array {name!r}: shape must be a list of at most "
                                                 f"{limits.max_ndim} dims")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
        raise ProtocolError(ErrorCode.MALFORMED, f"array {name!r}: shape {shape} must hold non-negative ints")
    itemsize = np.dtype(dtype).itemsize
    nbytes = math.prod(shape) * itemsize  # Python ints: no overflow
    if nbytes != len(view):
        raise ProtocolError(ErrorCode.MALFORMED, f"array {name!r}: shape {shape} x {itemsize} B = {nbytes} B "
                                                 f"but its frame has {len(view)} B")
    arr = np.frombuffer(view, dtype=np.dtype(dtype)).reshape(shape) if nbytes else \
        np.zeros(shape, dtype=np.dtype(dtype))
    return name, (arr.copy() if copy else arr)
