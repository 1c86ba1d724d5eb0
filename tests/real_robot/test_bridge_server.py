"""Policy server and client over real sockets: the Policy interface over the network, CURVE
authentication, malformed / oversized / unauthenticated messages refused while the server keeps serving."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zmq
from bridge_helpers import ScriptedConfig, tiny_mlp
from embodied_distill.real_robot.auth import ensure_keys, generate_certificate, load_keypair, load_public_key
from embodied_distill.real_robot.client import RemotePolicy
from embodied_distill.real_robot.estop import EStopEndpoint, send_estop
from embodied_distill.real_robot.protocol import (
    PROTOCOL_NAME,
    AuthenticationError,
    EStopError,
    Message,
    RemoteError,
    ServerUnavailable,
    decode,
    encode,
)
from embodied_distill.real_robot.rpc import ClientConfig, RPCClient, ServerConfig
from embodied_distill.real_robot.safety import EStop
from embodied_distill.real_robot.server import PolicyServer

LIMIT = 256 * 1024


class GaussianMLP(torch.nn.Module):
    """A tiny policy with an action distribution (what a teacher exposes)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_mlp()
        self.config = self.inner.config
        self.name = "gaussian"

    def reset(self):
        self.inner.reset()

    def predict_action_chunk(self, obs):
        return self.inner.predict_action_chunk(obs)

    def action_distribution(self, obs):
        mean = self.inner.predict_action_chunk(obs)
        return torch.distributions.Normal(mean, torch.full_like(mean, 0.1))


@pytest.fixture(scope="module")
def served(keys_dir):
    policy = GaussianMLP()
    server = PolicyServer(policy, ServerConfig(port=0, keys_dir=keys_dir, max_message_bytes=LIMIT)).start()
    yield server, policy
    server.stop()


def _raw_socket(address, keys=None):
    """A bare DEALER socket (optionally with CURVE keys) for sending hand-made frames."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    sock.connect(address)
    return sock


def _request(sock, frames, timeout_ms=2000):
    sock.send_multipart(frames)
    if not sock.poll(timeout_ms):
        return None
    return decode(sock.recv_multipart())


def _assert_still_serving(server, keys_dir):
    with RemotePolicy(server.address, keys_dir=keys_dir) as p:
        out = p.predict_action_chunk({"state": torch.zeros(1, 2, 7)})
        assert out.shape == (1, 8, 7)


def test_remote_policy_implements_the_policy_interface(served, keys_dir):
    server, policy = served
    assert server.address.startswith("tcp://127.0.0.1:")  # loopback unless told otherwise
    obs = torch.randn(3, 2, 7)
    with RemotePolicy(server.address, keys_dir=keys_dir) as remote:
        assert remote.config.obs_keys == ("state",) and remote.config.action_horizon == 8
        np.testing.assert_array_equal(remote.predict_action_chunk({"state": obs}).numpy(),
                                      policy.predict_action_chunk({"state": obs}).numpy())
        dist = remote.action_distribution({"state": obs})
        assert set(dist) == {"mean", "std"} and dist["std"].shape == (3, 8, 7)
        local = tiny_mlp()
        remote.reset()
        local.reset()
        for t in range(9):  # select_action: same history, queue and re-planning as a local Policy
            o = {"state": torch.randn(1, 7, generator=torch.Generator().manual_seed(t))}
            np.testing.assert_allclose(remote.select_action(o).numpy(), local.select_action(o).numpy(),
                                       atol=1e-6)
        with pytest.raises(RemoteError) as e:  # wrong observation horizon
            remote.predict_action_chunk({"state": torch.zeros(1, 5, 7)})
        assert e.value.code == "bad_request"


def test_a_policy_without_distribution_says_so(keys_dir):
    with PolicyServer(tiny_mlp(), ServerConfig(port=0, keys_dir=keys_dir)) as server, \
            RemotePolicy(server.address, keys_dir=keys_dir) as remote:
        assert remote.action_distribution is None
        with pytest.raises(RemoteError) as e:
            remote._rpc.call("action_distribution", arrays={"state": np.zeros((1, 2, 7), np.float32)})
        assert e.value.code == "bad_request"


def test_unauthenticated_clients_get_nothing_and_the_server_keeps_serving(served, keys_dir, tmp_path):
    server, _ = served
    served_before = server.stats["served"]
    # 1. no CURVE at all: the handshake never completes, not a byte of the request is processed
    plain = _raw_socket(server.address)
    frames = encode(Message("predict_chunk", 1, {}, {"state": np.zeros((1, 2, 7), np.float32)}))
    assert _request(plain, frames, timeout_ms=500) is None
    plain.close()
    with pytest.raises(AuthenticationError):
        RPCClient(ClientConfig(address=server.address, auth=False, connect_timeout_s=0.5)).call("ping")
    # 2. a valid CURVE key the server has never authorised
    other = ensure_keys(tmp_path / "other")
    shutil.copy(ensure_keys(keys_dir).server_public, tmp_path / "their_server.key")
    with pytest.raises(AuthenticationError, match="refused this client's key"):
        RPCClient(ClientConfig(address=server.address, keys_dir=str(other.root), connect_timeout_s=1.0,
                               server_key=str(tmp_path / "their_server.key"))).call("ping")
    # 3. the right client key but a wrong server key (a man in the middle would look like this)
    generate_certificate(tmp_path, "fake_server")
    with pytest.raises(AuthenticationError):
        RPCClient(ClientConfig(address=server.address, keys_dir=keys_dir, connect_timeout_s=0.5,
                               server_key=str(tmp_path / "fake_server.key"))).call("ping")
    assert server.stats["served"] == served_before
    _assert_still_serving(server, keys_dir)


def test_malformed_messages_get_error_replies_and_the_server_keeps_serving(served, keys_dir):
    server, _ = served
    paths = ensure_keys(keys_dir)
    keys = (*load_keypair(paths.client_secret), load_public_key(paths.server_public))
    sock = _raw_socket(server.address, keys)
    good_head = {"proto": PROTOCOL_NAME, "v": 1, "type": "predict_chunk", "id": 5, "body": {},
                 "arrays": [{"name": "state", "dtype": "<f4", "shape": [1, 2, 7]}]}
    state = np.zeros((1, 2, 7), np.float32).tobytes()
    cases = [
        ([b"garbage"], "malformed"),
        ([b"\x80\x81"], "malformed"),
        ([json.dumps({**good_head, "v": 2}).encode(), state], "version"),
        ([json.dumps(good_head).encode()], "malformed"),                                    # frame missing
        ([json.dumps(good_head).encode(), state[:-4]], "malformed"),                        # short frame
        ([json.dumps({**good_head, "arrays": [{"name": "state", "dtype": "|O", "shape": [56]}]}).encode(),
          state], "malformed"),                                                              # pickle-able
        ([json.dumps({**good_head, "type": "rm_rf"}).encode(), state], "unknown_type"),
        ([json.dumps({**good_head, "arrays": [{"name": "image", "dtype": "<f4", "shape": [1, 2, 7]}]})
          .encode(), state], "bad_request"),                                                 # wrong key
        ([json.dumps({**good_head, "arrays": [{"name": "state", "dtype": "<f4", "shape": [1, 2, 3]}]})
          .encode(), np.zeros(6, np.float32).tobytes()], "policy_error"),                    # policy raised
    ]
    for frames, code in cases:
        rep = _request(sock, frames)
        assert rep is not None and rep.type == "error" and rep.body["code"] == code, (frames[0][:60], rep)
    sock.send_multipart([b"", json.dumps({**good_head, "type": "ping", "arrays": []}).encode()])  # REQ-style
    assert sock.poll(2000)
    frames = sock.recv_multipart()
    assert frames[0] == b"" and decode(frames[1:]).body["server"] == "policy"  # envelope echoed
    sock.close()
    _assert_still_serving(server, keys_dir)


def test_oversized_messages_are_refused_and_the_server_keeps_serving(served, keys_dir):
    server, _ = served
    paths = ensure_keys(keys_dir)
    keys = (*load_keypair(paths.client_secret), load_public_key(paths.server_public))
    head = {"proto": PROTOCOL_NAME, "v": 1, "type": "predict_chunk", "id": 9, "body": {},
            "arrays": [{"name": f"a{i}", "dtype": "|u1", "shape": [LIMIT // 2]} for i in range(3)]}
    # 1. each frame under the limit, the message over it: an "oversized" error reply
    sock = _raw_socket(server.address, keys)
    rep = _request(sock, [json.dumps(head).encode(), *[bytes(LIMIT // 2)] * 3])
    assert rep.type == "error" and rep.body["code"] == "oversized"
    sock.close()
    # 2. one frame over the limit: ZeroMQ drops the connection before the server sees it
    sock = _raw_socket(server.address, keys)
    head["arrays"] = [{"name": "a", "dtype": "|u1", "shape": [4 * LIMIT]}]
    assert _request(sock, [json.dumps(head).encode(), bytes(4 * LIMIT)], timeout_ms=500) is None
    sock.close()
    # 3. the client refuses to send an oversized request in the first place
    with RemotePolicy(server.address, keys_dir=keys_dir) as p, pytest.raises(Exception, match="oversized"):
        p.predict_action_chunk({"state": np.zeros((1, 2, LIMIT), np.float32)})
    assert server.stats["rejected_oversized"] >= 1
    _assert_still_serving(server, keys_dir)


def test_estop_latches_the_policy_server(keys_dir):
    with PolicyServer(tiny_mlp(), ServerConfig(port=0, keys_dir=keys_dir)) as server, \
            RemotePolicy(server.address, keys_dir=keys_dir) as remote:
        obs = {"state": torch.zeros(1, 2, 7)}
        remote.predict_action_chunk(obs)
        remote.estop("test")
        with pytest.raises(EStopError):
            remote.predict_action_chunk(obs)
        remote.estop_release()
        assert remote.predict_action_chunk(obs).shape == (1, 8, 7)


def test_stateful_sessions_are_owned(keys_dir):
    policy = tiny_mlp()
    policy.stateful_select_action = True  # as a streaming-diffusion policy would declare
    with PolicyServer(policy, ServerConfig(port=0, keys_dir=keys_dir)) as server, \
            RemotePolicy(server.address, keys_dir=keys_dir) as a, \
            RemotePolicy(server.address, keys_dir=keys_dir) as b:
        a.reset()
        assert a.select_action({"state": torch.zeros(1, 7)}).shape == (1, 7)
        with pytest.raises(RemoteError) as e:
            b.reset()
        assert e.value.code == "busy"


def test_estop_endpoint_and_server_config_guards(keys_dir):
    es = EStop()
    stops: list[str] = []
    es.add_callback(stops.append)
    try:
        with EStopEndpoint(es, ServerConfig(port=0, keys_dir=keys_dir)) as ep:
            assert send_estop(ep.address, "operator", keys_dir=keys_dir) == {"estopped": True}
            assert es.wait(1.0) and es.reason == "network: operator"
    finally:
        es.close()
    assert stops == ["e-stop: network: operator"]
    with pytest.raises(ValueError, match="without authentication"):
        ServerConfig(host="0.0.0.0", auth=False)
    ServerConfig(host="127.0.0.1", auth=False)
    with pytest.raises(ServerUnavailable):
        RPCClient(ClientConfig(address="tcp://127.0.0.1:1", keys_dir=keys_dir,
                               connect_timeout_s=0.3)).call("ping")


class Instructed(torch.nn.Module):
    """A VLA-like policy that also reads a text instruction per sample."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_mlp()
        self.config = ScriptedConfig()
        self.config.obs_keys = ("state", "instruction")
        self.seen: list[list[str]] = []

    def reset(self):
        self.inner.reset()

    def predict_action_chunk(self, obs):
        self.seen.append(obs["instruction"])
        return self.inner.predict_action_chunk({"state": obs["state"]})


def test_text_observations_reach_the_policy(keys_dir):
    policy = Instructed()
    with PolicyServer(policy, ServerConfig(port=0, keys_dir=keys_dir)) as server, \
            RemotePolicy(server.address, keys_dir=keys_dir) as remote:
        out = remote.predict_action_chunk({"state": torch.zeros(2, 2, 7), "instruction": ["pick", "place"]})
        assert out.shape == (2, 8, 7) and policy.seen[-1] == ["pick", "place"]
        remote.reset()
        assert remote.select_action({"state": torch.zeros(1, 7), "instruction": "stack"}).shape == (1, 7)
        assert policy.seen[-1] == ["stack"]
        with pytest.raises(RemoteError, match="must agree"):  # 2 instructions for a batch of 1
            remote.predict_action_chunk({"state": torch.zeros(1, 2, 7), "instruction": ["a", "b"]})
