"""Unit tests of api/."""
