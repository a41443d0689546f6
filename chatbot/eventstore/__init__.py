"""The event store: events in PostgreSQL, encrypted per user, hash-chained; snapshots and keys.

- application.py: the application on this store (`StoredChatApplication`), built from the
  settings (`chat_application`, the composition root), and the event log (`event_log`)
- store.py: the store's factories (PostgreSQL, and in memory for tests)
- log.py: the notification log that the relay and the projector read
- aggregate_cache.py: the repository that keeps saved conversations and personas in memory
- state_snapshot.py: snapshots of any aggregate state JSON can carry
- batching.py: leader/follower batching of blocking calls (group commits, cache reads)
- keys.py: per-user data keys, the key stores, erasure (crypto-shredding)
- mapper.py: the cipher and the mapper that encrypt each event under its user's key
- chain.py: the keyed hash chain and the PostgreSQL recorder that writes it
- snapshots.py: sealed snapshots, the newest of each aggregate
- group_commit.py: saves that share one transaction, and the bounds of a save
"""
