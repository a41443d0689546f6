"""The user text of the read models, sealed under its owner's data key, and searchable.

The events are encrypted under each user's data key (chatbot/eventstore/keys.py), and erasing a
user destroys that key. The read models hold the same text, so they are sealed the same way:
every message text, conversation title and shared snapshot is stored as AES-SIV ciphertext
under a key derived from the owner's data key (personas, whose events are under the master
key, under one derived from it). Destroying the data key shreds the rows too, wherever
PostgreSQL still keeps their bytes: dead tuples in the table files, the WAL, base backups.

AES-SIV is deterministic: the same text in the same cell (the row's id and the column are
bound in as associated data) always seals to the same bytes, so a rebuilt read model can be
compared row by row with the live one, and nothing else about the text is revealed.

Search works without the text: each row keeps a blind index, the keyed hashes (BLAKE2b under
a second key derived from the owner's) of its words and of their prefixes of 3 to
`PREFIX_MAX` characters, so `lisb` finds "Lisbon". A query is hashed the same way under the
searching user's key; every word of it must be in the title or in one message.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from uuid import UUID

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from chatbot.eventstore.keys import DataErased, DataKey, KeyStore

PLAIN = b"\x00"  # a value stored as UTF-8 (no key store: tests of the read models alone)
SEALED = b"\x01"  # AES-SIV under the owner's read-model key
PREFIX_MIN, PREFIX_MAX = 3, 12
WORD = re.compile(r"[^\W_]+")  # letters and digits (snake_case is two words)
DERIVED_MAX = 4096  # derived keys kept per process (about 1 KB each)
UNKEYED = hashlib.blake2b(digest_size=8)  # without a key store (tests of the read models alone)


def words_of(text: str) -> set[str]:
    """The words of `text`, case-folded, and their prefixes of PREFIX_MIN..PREFIX_MAX characters."""
    found = set()
    for word in WORD.findall(text.casefold()):
        found.add(word)
        found.update(word[:k] for k in range(PREFIX_MIN, min(len(word), PREFIX_MAX + 1)))
    return found


def query_words(query: str) -> list[str]:
    """The words a search for `query` needs (each matches a whole word or, from PREFIX_MIN to
    PREFIX_MAX characters, the start of one)."""
    return sorted(set(WORD.findall(query.casefold())))


class _Derived:
    __slots__ = ("siv", "index")

    def __init__(self, key: bytes) -> None:
        # two independent keys from the data key (HMAC-SHA512 as the PRF of HKDF's expand step)
        self.siv = AESSIV(hmac.new(key, b"chatbot read models: AES-SIV", hashlib.sha512).digest())
        index_key = hmac.new(key, b"chatbot read models: blind index", hashlib.sha256).digest()
        self.index = hashlib.blake2b(key=index_key, digest_size=8)  # keyed once, copied per word


class Sealer:
    """Seals and opens read-model text, and hashes words for search, per owner.

    `keys` is the key store of the process's event store, so an erasure this process made
    stops its reads at once. Without one (`Sealer(None)`) text is stored as plain UTF-8:
    only for tests of the read models alone."""

    def __init__(self, keys: KeyStore | None) -> None:
        self.keys = keys
        self._derived: dict[bytes, _Derived] = {}
        self._lock = threading.Lock()

    def _key(self, owner: UUID | None) -> _Derived:
        assert self.keys is not None
        data_key: DataKey = self.keys.master if owner is None else self.keys.key_for(owner, create=True)
        derived = self._derived.get(data_key.key)
        if derived is None:
            derived = _Derived(data_key.key)
            with self._lock:
                if len(self._derived) >= DERIVED_MAX:
                    self._derived.clear()
                self._derived[data_key.key] = derived
        return derived

    def seal(self, owner: UUID | None, text: str, column: str, row_id: UUID) -> bytes:
        data = text.encode()
        if self.keys is None:
            return PLAIN + data
        return SEALED + self._key(owner).siv.encrypt(data, [column.encode(), row_id.bytes])

    def open(self, owner: UUID | None, value: bytes | memoryview | None, column: str, row_id: UUID) -> str | None:
        """The text, or None when it cannot be read: its owner was erased (or it is damaged)."""
        if value is None:
            return None
        value = bytes(value)
        if value[:1] == PLAIN:
            return value[1:].decode()
        if self.keys is None:
            return None
        try:
            return self._key(owner).siv.decrypt(value[1:], [column.encode(), row_id.bytes]).decode()
        except DataErased:
            return None
        except Exception:  # noqa: BLE001 - InvalidTag: damaged or sealed for another row
            return None

    def index(self, owner: UUID | None, text: str) -> str:
        """The blind index of `text`, a keyed 64-bit hash of each of its words and prefixes,
        as a PostgreSQL bigint[] literal (psycopg adapts a string many times faster than a list)."""
        return "{" + ",".join(map(str, self._hashes(owner, words_of(text)))) + "}"

    def terms(self, owner: UUID | None, query: str) -> list[int]:
        return self._hashes(owner, query_words(query))

    def _hashes(self, owner: UUID | None, words: set[str] | list[str]) -> list[int]:
        if not words:
            return []
        keyed = self._key(owner).index if self.keys is not None else UNKEYED
        hashes = []
        for word in words:
            h = keyed.copy()
            h.update(word.encode())
            hashes.append(int.from_bytes(h.digest(), "big", signed=True))
        return sorted(hashes)
