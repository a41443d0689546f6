"""A bounded fault-injection run against the real stack: `make chaos` (tests/chaos/run.py)."""
