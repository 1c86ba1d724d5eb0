"""CURVE keys for the bridge's servers and clients, stored as files (ZeroMQ's certificate format).

Authentication is on by default. A key directory holds::

    keys/                       (mode 0700)
      server.key                the servers' public key: give it to every client
      server.key_secret         the servers' secret key (mode 0600, never leaves the machine)
      client.key                this machine's client public key: give it to every server it talks to
      client.key_secret         this machine's client secret key (mode 0600)
      authorized_clients/       public keys of the clients a server accepts (one ``*.key`` file each)

``ensure_keys(dir)`` creates whatever is missing and authorises the local client, so a server and a
client on one machine (loopback) work with no setup. Across machines::

    # on the robot computer and on the policy computer
    python -m embodied_distill.real_robot.auth init
    # copy the server's server.key to the client machine, and the client's client.key to the server:
    python -m embodied_distill.real_robot.auth authorize /path/to/their/client.key   # on the server
    # then point the client at the copied server key: server_key=/path/to/their/server.key

The default directory is ``$EMBODIED_DISTILL_KEYS`` or ``~/.config/embodied_distill/keys``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import sys
from pathlib import Path

SERVER_NAME = "server"
CLIENT_NAME = "client"


def default_keys_dir() -> Path:
    """``$EMBODIED_DISTILL_KEYS`` or ``~/.config/embodied_distill/keys``."""
    env = os.environ.get("EMBODIED_DISTILL_KEYS")
    return Path(env).expanduser() if env else Path.home() / ".config" / "embodied_distill" / "keys"


@dataclasses.dataclass(frozen=True)
class KeyPaths:
    """Where each key of a key directory lives."""

    root: Path
    """The key directory."""

    @property
    def server_public(self) -> Path:
        return self.root / f"{SERVER_NAME}.key"

    @property
    def server_secret(self) -> Path:
        return self.root / f"{SERVER_NAME}.key_secret"

    @property
    def client_public(self) -> Path:
        return self.root / f"{CLIENT_NAME}.key"

    @property
    def client_secret(self) -> Path:
        return self.root / f"{CLIENT_NAME}.key_secret"

    @property
    def authorized(self) -> Path:
        return self.root / "authorized_clients"


def _write_certificate(base: Path, public: bytes, secret: bytes) -> None:
    """Write ``base.key`` (0644) and ``base.key_secret`` (0600) in ZeroMQ's certificate format."""
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    head = f"#   ****  Generated on {stamp} by embodied_distill  ****\n#   ZeroMQ CURVE {{}} Certificate\n\n"
    pub_text = head.format("Public") + f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    sec_text = head.format("**Secret**") + (f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
                                            f'    secret-key = "{secret.decode()}"\n')
    fd = os.open(f"{base}.key_secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(sec_text)
    fd = os.open(f"{base}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(pub_text)


def generate_certificate(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Create a fresh keypair ``<directory>/<name>.key`` / ``.key_secret``; refuses to overwrite."""
    import zmq

    directory = Path(directory)
    if (directory / f"{name}.key").exists() or (directory / f"{name}.key_secret").exists():
        raise FileExistsError(f"{directory / name}.key already exists; delete it to make a new key")
    public, secret = zmq.curve_keypair()
    _write_certificate(directory / name, public, secret)
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def ensure_keys(keys_dir: str | Path | None = None, authorize_local_client: bool = True) -> KeyPaths:
    """Create the key directory, the server and client keypairs when missing, and (by default) authorise
    this machine's own client key; returns the paths. Idempotent."""
    paths = KeyPaths(Path(keys_dir).expanduser() if keys_dir else default_keys_dir())
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths.authorized.mkdir(exist_ok=True, mode=0o700)
    for name, public in ((SERVER_NAME, paths.server_public), (CLIENT_NAME, paths.client_public)):
        if not public.exists():
            try:
                generate_certificate(paths.root, name)
            except FileExistsError:  # another process created it between the check and the write
                pass
    local = paths.authorized / "local_client.key"
    if authorize_local_client and not local.exists():
        tmp = local.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(paths.client_public, tmp)
        os.replace(tmp, local)
    return paths


def load_public_key(path: str | Path) -> bytes:
    """The z85 public key in a certificate file (``*.key`` or ``*.key_secret``)."""
    import zmq.auth

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no key file at {path} (create keys with "
                                "`python -m embodied_distill.real_robot.auth init`)")
    public, _ = zmq.auth.load_certificate(str(path))
    if not public:
        raise ValueError(f"{path} holds no public key")
    return public


def load_keypair(secret_path: str | Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 keys from a ``*.key_secret`` certificate file."""
    import zmq.auth

    secret_path = Path(secret_path).expanduser()
    if not secret_path.is_file():
        raise FileNotFoundError(f"no secret key file at {secret_path} (create keys with "
                                "`python -m embodied_distill.real_robot.auth init`)")
    public, secret = zmq.auth.load_certificate(str(secret_path))
    if not public or not secret:
        raise ValueError(f"{secret_path} is not a secret certificate (no secret-key)")
    return public, secret


def authorize_client(keys_dir: str | Path | None, public_key_file: str | Path,
                     name: str | None = None) -> Path:
    """Copy a client's public key into ``authorized_clients/`` (servers read it when they start)."""
    paths = ensure_keys(keys_dir, authorize_local_client=False)
    load_public_key(public_key_file)  # validate before trusting it
    target = paths.authorized / f"{name or Path(public_key_file).stem}.key"
    shutil.copyfile(Path(public_key_file).expanduser(), target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embodied_distill.real_robot.auth",
                                     description="Manage the CURVE keys of the robot bridge.")
    parser.add_argument("--keys-dir", default=None, help=f"key directory (default {default_keys_dir()})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init", help="create missing keys and authorise the local client")
    auth = sub.add_parser("authorize", help="authorise a remote client's public key file")
    auth.add_argument("public_key_file")
    auth.add_argument("--name", default=None)
    sub.add_parser("show", help="print the key paths and the authorised clients")
    args = parser.parse_args(argv)
    if args.cmd == "init":
        paths = ensure_keys(args.keys_dir)
        print(f"keys in {paths.root}\n  give clients: {paths.server_public}\n"
              f"  give servers: {paths.client_public}")
    elif args.cmd == "authorize":
        print(f"authorised: {authorize_client(args.keys_dir, args.public_key_file, args.name)}")
    else:
        paths = KeyPaths(Path(args.keys_dir).expanduser() if args.keys_dir else default_keys_dir())
        print(f"root: {paths.root}")
        for p in (paths.server_public, paths.client_public):
            print(f"  {p}: {load_public_key(p).decode() if p.exists() else 'missing'}")
        for p in sorted(paths.authorized.glob("*.key")) if paths.authorized.exists() else []:
            print(f"  authorised {p.name}: {load_public_key(p).decode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
