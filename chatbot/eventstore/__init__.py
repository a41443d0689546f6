"""The event store: events in PostgreSQL, encrypted per user, hash-chained; snapshots and keys.

- store.py: the factories `PERSISTENCE_MODULE` names (PostgreSQL, and in memory for tests)
- keys.py: per-user data keys, the key stores, erasure (crypto-shredding)
- mapper.py: the cipher and the mapper that encrypt each event under its user's key
- chain.py: the keyed hash chain and the PostgreSQL recorder that writes it
- snapshots.py: sealed snapshots, the newest of each aggregate
- group_commit.py: saves that share one transaction, and the bounds of a save
"""
