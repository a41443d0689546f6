"""Unit tests of projections/."""
