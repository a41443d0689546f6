"""The event store: events in PostgreSQL, encrypted per user, hash-chained; snapshots and keys."""
