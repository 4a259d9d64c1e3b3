"""CURVE key files: make a keypair (``narun keys generate DIR``) and load keys back.

The files use ZeroMQ's certificate format (``zmq.auth.load_certificate`` reads them):
NAME.key holds the public key and may be copied anywhere; NAME.key_secret holds both keys
and is created with mode 0600. Keys are z85 text, 40 characters for 32 bytes.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zmq
import zmq.utils.z85

from narun.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_KEY_LINE = re.compile(r'^\s*(public|secret)-key\s*=\s*"([^"]*)"\s*$', re.MULTILINE)


@dataclass(frozen=True, repr=False)
class KeyPair:
    """A CURVE keypair as z85 bytes; repr never shows the secret."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.decode()!r})"


def generate_keypair(directory: str | os.PathLike[str], name: str = "narun") -> tuple[Path, Path]:
    """Write a new keypair as ``DIRECTORY/NAME.key`` and ``DIRECTORY/NAME.key_secret``.

    Returns (public_path, secret_path). The directory is created (mode 0700) if missing;
    existing key files are never overwritten (ConfigError names them).
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(f"key name {name!r}: expected letters, digits, '.', '_' or '-'")
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path, secret_path = root / f"{name}.key", root / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite a key "
                              f"(choose another name or delete it first)")
    public, secret = zmq.curve_keypair()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    _write_new(secret_path, _certificate(stamp, "Secret", public, secret), 0o600)
    _write_new(public_path, _certificate(stamp, "Public", public, None), 0o644)
    return public_path, secret_path


def load_keypair(path: str | os.PathLike[str]) -> KeyPair:
    """The keypair in a NAME.key_secret file; refuses a file others can read."""
    path = Path(path)
    keys = _read_keys(path)
    if "secret" not in keys:
        raise ConfigError(f"{path}: no 'secret-key = \"...\"' line; is this a public .key file?")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: secret key file is accessible by others (mode "
                          f"{stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
    if zmq.curve_public(keys["secret"]) != keys["public"]:
        raise ConfigError(f"{path}: public-key does not belong to secret-key")
    return KeyPair(keys["public"], keys["secret"])


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key in a NAME.key (or NAME.key_secret) file."""
    return _read_keys(Path(path))["public"]


def load_allowed_keys(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                      ) -> frozenset[bytes]:
    """Client public keys for an allow-list: a directory (every ``*.key`` in it), one key
    file, or several files. An empty allow-list is a ConfigError: it would refuse everyone.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        paths = sorted(root.glob("*.key")) if root.is_dir() else [root]
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise ConfigError(f"no public keys (*.key) in {source}: an empty allow-list would "
                          f"refuse every client")
    return frozenset(load_public_key(p) for p in paths)


AUTHORIZED = "authorized"  # DIR/authorized/*.key: the public keys a node admits


@dataclass(frozen=True)
class NodeKeys:
    """A node's key directory: its own pair, and the public keys it admits by name (the
    file name without .key: a host name, a coordinator's name)."""

    directory: Path
    keypair: KeyPair
    authorized: dict[str, bytes]

    def public_key_of(self, name: str) -> bytes:
        """The authorised key filed under `name` (how a client learns a server's key)."""
        key = self.authorized.get(name)
        if key is None:
            raise ConfigError(
                f"{self.directory}: no public key for {name!r} in {AUTHORIZED}/; copy that "
                f"node's NAME.key here and run: narun keys authorize {self.directory} "
                f"NAME.key --name {name}")
        return key


def load_node_keys(directory: str | os.PathLike[str]) -> NodeKeys:
    """The key pair in DIRECTORY (its one NAME.key_secret) and DIRECTORY/authorized/*.key."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--keys {root}: no such directory; make a key pair with: narun "
                          f"keys generate {root} --name $(hostname)")
    secrets = sorted(root.glob("*.key_secret"))
    if len(secrets) != 1:
        found = ", ".join(p.name for p in secrets) or "none"
        raise ConfigError(f"--keys {root}: expected exactly one NAME.key_secret, found "
                          f"{found}; make one with: narun keys generate {root} --name "
                          f"$(hostname)")
    allowed = {p.name[:-len(".key")]: load_public_key(p)
               for p in sorted((root / AUTHORIZED).glob("*.key"))}
    return NodeKeys(root, load_keypair(secrets[0]), allowed)


def authorize(directory: str | os.PathLike[str], public_key_file: str | os.PathLike[str],
              name: str | None = None) -> Path:
    """Admit the key in `public_key_file`: copy it to DIRECTORY/authorized/NAME.key (NAME
    defaults to the file's own name). Refuses a secret key file, and a different key
    already filed under that name."""
    source = Path(public_key_file)
    keys = _read_keys(source)
    if "secret" in keys:
        raise ConfigError(f"{source}: holds a secret key; authorize the public NAME.key "
                          f"file instead (the secret never leaves its host)")
    name = name or source.name.removesuffix(".key").removesuffix(".key_secret")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: expected letters, digits, '.', '_' or '-'")
    target_dir = Path(directory) / AUTHORIZED
    target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = target_dir / f"{name}.key"
    if target.exists():
        if load_public_key(target) == keys["public"]:
            return target
        raise ConfigError(f"{target}: another key is already authorized as {name!r}; "
                          f"remove it first, or pass another --name")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    _write_new(target, _certificate(stamp, "Public", keys["public"], None), 0o644)
    return target


def _certificate(stamp: str, kind: str, public: bytes, secret: bytes | None) -> str:
    lines = [
        f"#   ****  Generated on {stamp} by narun  ****",
        f"#   ZeroMQ CURVE {kind} Certificate",
        "#   Exchange the .key file freely; never share the .key_secret file.",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int) -> None:
    # Written under a temporary name, then hard-linked into place: the key appears whole or
    # not at all, and link() fails rather than replace a file created meanwhile.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a key") from None
    finally:
        tmp.unlink(missing_ok=True)


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise ConfigError(f"key file {path} not found (make one with: narun keys generate "
                          f"{path.parent})") from None


def _read_keys(path: Path) -> dict[str, bytes]:
    _stat(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read key file: {exc}") from exc
    keys: dict[str, bytes] = {}
    for which, value in _KEY_LINE.findall(text):
        key = value.encode("ascii")
        if len(key) != 40:
            raise ConfigError(f"{path}: {which}-key: expected 40 z85 characters, got "
                              f"{len(value)}")
        if not _is_z85(key):
            raise ConfigError(f"{path}: {which}-key is not valid z85 text")
        keys[which] = key
    if "public" not in keys:
        raise ConfigError(f"{path}: expected a line 'public-key = \"<40 z85 characters>\"'")
    return keys


def _is_z85(key: bytes) -> bool:
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError, struct.error):
        return False
    return True
