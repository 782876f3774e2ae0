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
