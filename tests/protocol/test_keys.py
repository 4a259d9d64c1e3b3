"""Key files: generated in ZeroMQ's certificate format, loaded back, bad files named."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth

from narun.errors import ConfigError
from protocol import generate_keypair, load_allowed_keys, load_keypair, load_public_key


def test_generate_writes_a_usable_keypair(tmp_path: Path) -> None:
    public_path, secret_path = generate_keypair(tmp_path / "new" / "dir", "node-1")
    assert (public_path.name, secret_path.name) == ("node-1.key", "node-1.key_secret")
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.parent.stat().st_mode) == 0o700
    pair = load_keypair(secret_path)
    assert len(pair.public) == len(pair.secret) == 40
    assert zmq.curve_public(pair.secret) == pair.public
    assert load_public_key(public_path) == pair.public
    assert "secret" not in repr(pair) and pair.secret.decode() not in repr(pair)
    # the same format pyzmq and CZMQ read
    assert zmq.auth.load_certificate(secret_path) == (pair.public, pair.secret)
    assert zmq.auth.load_certificate(public_path) == (pair.public, None)
    assert pair.secret.decode() not in public_path.read_text()


def test_keys_are_never_overwritten(tmp_path: Path) -> None:
    public_path, secret_path = generate_keypair(tmp_path)
    before = secret_path.read_bytes()
    with pytest.raises(ConfigError, match="narun.key already exists; refusing to overwrite"):
        generate_keypair(tmp_path)
    assert secret_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narun.key", "narun.key_secret"]


def test_allow_list_from_a_directory_or_files(tmp_path: Path) -> None:
    keys = [load_public_key(generate_keypair(tmp_path / "clients", n)[0]) for n in "abc"]
    assert load_allowed_keys(tmp_path / "clients") == frozenset(keys)
    assert load_allowed_keys([tmp_path / "clients" / "a.key"]) == {keys[0]}
    assert load_allowed_keys(tmp_path / "clients" / "b.key") == {keys[1]}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no public keys .* would refuse every client"):
        load_allowed_keys(tmp_path / "empty")


def test_bad_key_files_are_named(tmp_path: Path) -> None:
    _, secret_path = generate_keypair(tmp_path)
    os.chmod(secret_path, 0o644)
    with pytest.raises(ConfigError, match=r"accessible by others \(mode 0644\); run: chmod 600"):
        load_keypair(secret_path)
    with pytest.raises(ConfigError, match="not found .*narun keys generate"):
        load_keypair(tmp_path / "missing.key_secret")
    with pytest.raises(ConfigError, match="no 'secret-key"):
        load_keypair(tmp_path / "narun.key")
    bad = tmp_path / "bad.key"
    bad.write_text('public-key = "short"\n')
    with pytest.raises(ConfigError, match="bad.key: public-key: expected 40 z85 characters, got 5"):
        load_public_key(bad)
    bad.write_text('public-key = "' + "~" * 40 + '"\n')
    with pytest.raises(ConfigError, match="not valid z85"):
        load_public_key(bad)
    bad.write_text("nothing here\n")
    with pytest.raises(ConfigError, match="expected a line 'public-key ="):
        load_public_key(bad)
    mismatched = tmp_path / "mixed.key_secret"
    other_public = load_public_key(generate_keypair(tmp_path, "other")[0])
    text = secret_path.read_text().replace(load_public_key(secret_path).decode(),
                                           other_public.decode())
    mismatched.write_text(text)
    os.chmod(mismatched, 0o600)
    with pytest.raises(ConfigError, match="public-key does not belong to secret-key"):
        load_keypair(mismatched)
    with pytest.raises(ConfigError, match="key name 'a/b'"):
        generate_keypair(tmp_path, "a/b")
