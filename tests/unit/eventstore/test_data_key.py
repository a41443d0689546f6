"""`DataKey` (OpenSSL through `cryptography`) reads and writes exactly what eventsourcing's
`AESCipher` (pycryptodome) does, so events stored by either read with the other."""

from __future__ import annotations

import base64
import os

import pytest
from Crypto.Cipher import AES
from eventsourcing.cipher import AESCipher
from eventsourcing.utils import Environment

from chatbot.eventstore.keys import DataKey, MemoryKeyStore
from chatbot.eventstore.mapper import KeyedCipher


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


def library_cipher(key: bytes) -> AESCipher:
    return AESCipher(Environment(env={"CIPHER_KEY": base64.b64encode(key).decode()}))


@pytest.mark.parametrize("plaintext", [b"", b"x", os.urandom(1000)])
def test_what_the_library_encrypts_a_data_key_decrypts_and_back(key: bytes, plaintext: bytes) -> None:
    assert DataKey(key).decrypt(library_cipher(key).encrypt(plaintext)) == plaintext
    assert library_cipher(key).decrypt(DataKey(key).encrypt(plaintext)) == plaintext


def test_associated_data_binds_like_pycryptodome_s(key: bytes) -> None:
    sealed = DataKey(key).encrypt(b"secret", b"user-key\x00abc")
    cipher = AES.new(key, AES.MODE_GCM, nonce=sealed[:12])
    cipher.update(b"user-key\x00abc")
    assert cipher.decrypt_and_verify(sealed[28:], sealed[12:28]) == b"secret"
    with pytest.raises(ValueError):
        DataKey(key).decrypt(sealed, b"user-key\x00abd")


def test_an_altered_or_short_ciphertext_is_refused_with_a_value_error(key: bytes) -> None:
    sealed = bytearray(DataKey(key).encrypt(b"hello"))
    sealed[-1] ^= 1
    with pytest.raises(ValueError, match="MAC check failed"):
        DataKey(key).decrypt(bytes(sealed))
    with pytest.raises(ValueError, match="too short"):
        DataKey(key).decrypt(b"\x00" * 27)


def test_the_keyed_cipher_uses_the_master_data_key_for_the_library_s_master_cipher(key: bytes) -> None:
    keys = MemoryKeyStore(key)
    cipher = KeyedCipher(library_cipher(key), keys)
    assert cipher.master is keys.master
    assert library_cipher(key).decrypt(cipher.encrypt(b"persona")) == b"persona"
    other = library_cipher(os.urandom(32))
    assert KeyedCipher(other, keys).master is other, "a different master cipher is kept as it is"


def test_a_full_owner_cache_drops_its_oldest_entries_and_keeps_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new aggregate's owner lives only in the cache until its first events commit: a
    full cache must not forget it (it would encrypt the aggregate's next events under the
    master key)."""
    import uuid

    from chatbot.eventstore import keys as eventstore

    monkeypatch.setattr(eventstore, "CACHE_MAX", 8)
    keys = MemoryKeyStore(os.urandom(32))
    owner = uuid.uuid4()
    aggregates = [uuid.uuid4() for _ in range(20)]
    for a in aggregates:
        keys.remember(a, owner)
        assert keys._owners.get(a) == owner, "the entry just remembered is always there"
        assert len(keys._owners) <= 8
    newest = aggregates[-6:]
    assert all(keys._owners.get(a) == owner for a in newest)
    assert keys._owners.get(aggregates[0]) is None  # the oldest went first
    # remembering an old entry again makes it the newest
    keys.remember(newest[0], owner)
    for a in (uuid.uuid4() for _ in range(4)):
        keys.remember(a, owner)
    assert keys._owners.get(newest[0]) == owner
