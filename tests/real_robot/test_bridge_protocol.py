"""Wire format: round trips, no pickle, every malformed or oversized message refused with a code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from embodied_distill.real_robot.protocol import (
    ALLOWED_DTYPES,
    PROTOCOL_NAME,
    VERSION,
    ErrorCode,
    EStopError,
    Message,
    MessageLimits,
    ProtocolError,
    RemoteError,
    decode,
    encode,
    error_reply,
    peek_id,
    raise_for_error,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

DTYPES = sorted(ALLOWED_DTYPES)


def _header(**over):
    h = {"proto": PROTOCOL_NAME, "v": VERSION, "type": "predict_chunk", "id": 7, "body": {},
         "arrays": [{"name": "state", "dtype": "<f4", "shape": [1, 2, 3]}]}
    h.update(over)
    return json.dumps(h).encode()


GOOD_ARRAY = np.arange(6, dtype=np.float32).tobytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=st.dictionaries(
           st.text(alphabet="abcdefghij._", min_size=1, max_size=12),
           st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(
               min_dims=0, max_dims=4, min_side=0, max_side=5))), max_size=4),
       body=st.dictionaries(st.text(max_size=8),
                            st.one_of(st.integers(-2**40, 2**40), st.text(max_size=10), st.booleans(),
                                      st.none(), st.lists(st.integers(), max_size=3)), max_size=4),
       mid=st.integers(0, 2**62))
def test_round_trip_preserves_arrays_body_and_id(arrays, body, mid):
    msg = Message("predict_chunk", mid, body, arrays)
    out = decode(encode(msg))
    assert (out.type, out.id, out.body, out.version) == ("predict_chunk", mid, body, VERSION)
    assert list(out.arrays) == list(arrays)
    for k, a in arrays.items():
        assert out.arrays[k].dtype == a.dtype and out.arrays[k].shape == a.shape
        np.testing.assert_array_equal(out.arrays[k], a)
        assert out.arrays[k].flags.writeable  # decoded copies can be handed to torch


def test_non_contiguous_big_endian_and_torch_inputs_are_normalised():
    import torch

    a = np.arange(24, dtype=">f8").reshape(4, 6)[:, ::2]  # big-endian, non-contiguous
    out = decode(encode(Message("x", arrays={"a": a, "t": torch.ones(2, 3)})))
    np.testing.assert_array_equal(out.arrays["a"], a.astype("<f8"))
    assert out.arrays["a"].dtype.str == "<f8" and out.arrays["t"].dtype.str == "<f4"


@pytest.mark.parametrize("value", [np.array(["a", "b"]), np.array([object()], dtype=object),
                                   np.ones(2, np.complex64), np.array(["x"], dtype="S1")])
def test_only_plain_numeric_arrays_travel(value):
    with pytest.raises(ProtocolError) as e:
        encode(Message("x", arrays={"v": value}))
    assert e.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("frames,code", [
    ([], ErrorCode.MALFORMED),
    ([b"\xff\xfe not utf8"], ErrorCode.MALFORMED),
    ([b"not json"], ErrorCode.MALFORMED),
    ([b"[1, 2, 3]"], ErrorCode.MALFORMED),
    ([b"[" * 5000 + b"]" * 5000], ErrorCode.MALFORMED),                      # nesting bomb
    ([_header(proto="other"), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(v=99), GOOD_ARRAY], ErrorCode.VERSION),
    ([_header(v="1"), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(type=""), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(type=5), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(id=-1), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(id=True), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(body=[1]), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header()], ErrorCode.MALFORMED),                                         # spec without a frame
    ([_header(), GOOD_ARRAY, GOOD_ARRAY], ErrorCode.MALFORMED),                 # frame without a spec
    ([_header(arrays=[{"name": "s", "dtype": "|O", "shape": [6]}]), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(arrays=[{"name": "s", "dtype": "<c8", "shape": [3]}]), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(arrays=[{"name": "s", "dtype": ">f4", "shape": [6]}]), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(arrays=[{"name": "s", "dtype": "<f4", "shape": [7]}]), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(arrays=[{"name": "s", "dtype": "<f4", "shape": [-6]}]), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(arrays=[{"name": "s", "dtype": "<f4", "shape": [2**40, 2**40]}]), GOOD_ARRAY],
     ErrorCode.MALFORMED),
    ([_header(arrays=[{"name": "s", "dtype": "<f4", "shape": [1] * 9 + [6]}]), GOOD_ARRAY],
     ErrorCode.MALFORMED),
    ([_header(arrays=[{"name": "", "dtype": "<f4", "shape": [6]}]), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(arrays=["s"]), GOOD_ARRAY], ErrorCode.MALFORMED),
    ([_header(arrays=[{"name": "s", "dtype": "<f4", "shape": [6]}] * 2), GOOD_ARRAY, GOOD_ARRAY],
     ErrorCode.MALFORMED),
])
def test_malformed_messages_are_refused_with_a_code(frames, code):
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    assert e.value.code == code


def test_size_limits_are_checked_before_decoding():
    limits = MessageLimits(max_message_bytes=4096, max_header_bytes=512, max_arrays=2)
    big = np.zeros(2048, np.float32)  # 8 KiB
    with pytest.raises(ProtocolError) as e:
        encode(Message("x", arrays={"a": big}), limits)
    assert e.value.code == ErrorCode.OVERSIZED
    with pytest.raises(ProtocolError) as e:  # a peer that ignores the limit is refused on receipt
        decode(encode(Message("x", arrays={"a": big})), limits)
    assert e.value.code == ErrorCode.OVERSIZED
    with pytest.raises(ProtocolError) as e:
        decode([_header(body={"pad": "x" * 600}), GOOD_ARRAY], limits)
    assert e.value.code == ErrorCode.OVERSIZED
    with pytest.raises(ProtocolError) as e:
        decode([b"{}", b"", b"", b""], limits)
    assert e.value.code == ErrorCode.OVERSIZED
    with pytest.raises(ValueError):
        MessageLimits(max_message_bytes=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_random_bytes_never_raise_anything_but_protocol_error(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass
    assert isinstance(peek_id(frames), int)


def test_error_replies_raise_typed_errors():
    assert raise_for_error(Message("reply", 1)).id == 1
    with pytest.raises(EStopError):
        raise_for_error(decode(encode(error_reply(3, ErrorCode.ESTOPPED, "stopped"))))
    with pytest.raises(RemoteError) as e:
        raise_for_error(error_reply(3, ErrorCode.BUSY, "x" * 5000))
    assert e.value.code == "busy" and len(e.value.message) == 1000
    assert peek_id([_header(id=42)]) == 42 and peek_id([b"junk"]) == 0
