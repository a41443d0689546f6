"""Unit tests of web/."""
