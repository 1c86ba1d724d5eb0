"""E-stop over the network: an authenticated endpoint in the deploy process, and a sender.

The deploy process (``python -m embodied_distill.deploy``) serves an ``EStopEndpoint`` (loopback and
CURVE by default, like every bridge server) that latches its :class:`~safety.EStop`, which stops the
robot. From any shell with an authorised key::

    python -m embodied_distill.real_robot.estop tcp://127.0.0.1:5560 [--reason "operator"]
    kill -USR1 <deploy pid>                        # the same, by signal, on the deploy machine

Message types: ``estop`` (``{reason}``) -> ``{estopped: true}``; ``status`` -> ``{estopped, reason}``.
"""

from __future__ import annotations

import argparse
import sys

from embodied_distill.real_robot.protocol import BridgeError, Message, reply
from embodied_distill.real_robot.rpc import ClientConfig, RPCClient, RPCServer, ServerConfig
from embodied_distill.real_robot.safety import EStop


class EStopEndpoint(RPCServer):
    """Serves ``estop`` and ``status`` for one :class:`EStop` (start with ``.start()``)."""

    name = "estop"

    def __init__(self, estop: EStop, config: ServerConfig | None = None):
        super().__init__(config)
        self.estop = estop
        self.handlers.update(estop=self._estop, status=self._status)

    def _estop(self, msg: Message) -> Message:
        self.estop.trigger(f"network: {str(msg.body.get('reason', 'estop'))[:200]}")
        return reply(msg, {"estopped": True})

    def _status(self, msg: Message) -> Message:
        return reply(msg, {"estopped": self.estop.triggered, "reason": self.estop.reason})


def send_estop(address: str, reason: str = "operator", keys_dir: str | None = None,
               server_key: str | None = None, auth: bool = True, timeout_s: float = 2.0) -> dict:
    """Trigger the e-stop served at ``address``; returns its reply body."""
    with RPCClient(ClientConfig(address=address, auth=auth, keys_dir=keys_dir, server_key=server_key,
                                timeout_s=timeout_s, connect_timeout_s=timeout_s)) as client:
        return client.call("estop", {"reason": reason}).body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embodied_distill.real_robot.estop",
                                     description="Send an e-stop to a running deployment.")
    parser.add_argument("address", help="the deployment's e-stop endpoint, e.g. tcp://127.0.0.1:5560")
    parser.add_argument("--reason", default="operator")
    parser.add_argument("--keys-dir", default=None)
    parser.add_argument("--server-key", default=None)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    try:
        body = send_estop(args.address, args.reason, args.keys_dir, args.server_key, timeout_s=args.timeout)
    except (BridgeError, FileNotFoundError) as e:
        print(f"e-stop NOT delivered to {args.address}: {e}", file=sys.stderr)
        return 1
    print(f"e-stop sent to {args.address}: {body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
