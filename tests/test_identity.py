"""Device identity: key pair, device id format, signatures, persistence in the store settings."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from peerdaemon.core.identity import (
    SETTING,
    Identity,
    default_name,
    load_or_create_identity,
    save_name,
    validate_name,
)
from peerdaemon.store import Store

ID_RE = re.compile(r"^([A-Z2-7]{7}-){7}[A-Z2-7]{3}$")


def test_device_id_is_grouped_base32_of_sha256_of_the_public_key():
    identity = Identity.generate("a")
    assert len(identity.public_key) == 32
    assert ID_RE.match(identity.device_id), identity.device_id
    expected = base64.b32encode(hashlib.sha256(identity.public_key).digest()).decode()[:52]
    assert identity.device_id.replace("-", "") == expected
    assert Identity.device_id_of(identity.public_key) == identity.device_id
    assert Identity.generate("b").device_id != identity.device_id


def test_sign_and_verify():
    identity = Identity.generate("a")
    signature = identity.sign(b"hello")
    assert Identity.verify(identity.public_key, signature, b"hello")
    assert not Identity.verify(identity.public_key, signature, b"hellO")
    assert not Identity.verify(Identity.generate().public_key, signature, b"hello")
    assert not Identity.verify(b"short", signature, b"hello")  # malformed key: False, no raise
    assert not Identity.verify(identity.public_key, b"x" * 10, b"hello")


def test_repr_never_shows_the_private_key():
    identity = Identity.generate("a")
    assert identity.private_bytes().hex() not in repr(identity)
    assert identity.device_id in repr(identity)


def test_identity_survives_a_restart(tmp_path):
    with Store.open(tmp_path) as store:
        first = load_or_create_identity(store)
        assert first.name == default_name()
        assert store.get_setting(SETTING)["name"] is None  # the hostname is not frozen
    with Store.open(tmp_path) as store:
        again = load_or_create_identity(store)
        assert again.device_id == first.device_id
        assert again.public_key == first.public_key
        signature = again.sign(b"x")
    assert Identity.verify(first.public_key, signature, b"x")


def test_name_option_overrides_and_persists(tmp_path):
    with Store.open(tmp_path) as store:
        device = load_or_create_identity(store, "laptop").device_id
    with Store.open(tmp_path) as store:
        identity = load_or_create_identity(store)
        assert (identity.device_id, identity.name) == (device, "laptop")
        renamed = load_or_create_identity(store, "  desk  ")
        assert renamed.name == "desk" and renamed.device_id == device
    with Store.open(tmp_path) as store:
        identity = load_or_create_identity(store)
        assert identity.name == "desk"
        save_name(store, identity, "tower")
    with Store.open(tmp_path) as store:
        assert load_or_create_identity(store).name == "tower"


@pytest.mark.parametrize("bad", ["", "   ", "a\nb", "x" * 65, 3, None])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError):
        validate_name(bad)


def test_bad_name_option_leaves_the_store_alone(tmp_path):
    with Store.open(tmp_path) as store:
        with pytest.raises(ValueError, match="control"):
            load_or_create_identity(store, "bad\tname")
        assert store.get_setting(SETTING) is None


def test_the_public_key_is_kept_beside_the_private_key_and_checked_before_signing(tmp_path):
    """The public key is derived once and kept (a later start needs no `cryptography`); an
    older setting without it gets it; a kept key that is not the private key's refuses to sign
    rather than sign what every peer would refuse."""
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from peerdaemon.core import identity as module

    for seed in [bytes(32), b"\xff" * 32, *(os.urandom(32) for _ in range(50))]:
        expected = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        assert module._openssl_public_key(seed) == expected  # (OpenSSL through `ssl`'s link)
        assert Identity.from_private_bytes(seed).public_key == expected
    with Store.open(tmp_path) as store:
        seed = os.urandom(32)
        store.put_setting(SETTING, {"private_key": seed, "name": "old"})  # before the key was kept
        identity = load_or_create_identity(store)
        public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        assert identity.public_key == public
        assert store.get_setting(SETTING) == {
            "private_key": seed,
            "public_key": public,
            "name": "old",
        }
        store.put_setting(SETTING, {"private_key": seed, "public_key": bytes(32), "name": "old"})
        wrong = load_or_create_identity(store)
        with pytest.raises(ValueError, match="does not match"):
            wrong.sign(b"x")
    with pytest.raises(ValueError):
        Identity.from_private_bytes(b"short")
    with pytest.raises(ValueError):
        Identity.from_private_bytes(seed, "x", b"short")


def test_an_identity_loads_cryptography_only_to_sign(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from peerdaemon.store import Store;"
        "from peerdaemon.core.identity import load_or_create_identity;"
        f"store = Store.open({str(tmp_path)!r}); i = load_or_create_identity(store, 'hub');"
        "print(i.device_id, 'cryptography' in sys.modules); i.sign(b'x');"
        "print('cryptography' in sys.modules); store.close()"
    )
    runs = []
    for _ in range(2):  # made, then read as kept
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        runs.append(out.stdout.split("\n")[:2])
    (made, _), (first, second) = runs
    assert made.split()[1] == "False" and first.split()[0] == made.split()[0]  # (OpenSSL's)
    assert ID_RE.match(first.split()[0]) and first.split()[1] == "False"
    assert second == "True"
