"""The read side: projections that build query tables from the events, each idempotent by
the tracking position it records in the same transaction as its rows."""
