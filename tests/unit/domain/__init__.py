"""Unit tests of domain/."""
