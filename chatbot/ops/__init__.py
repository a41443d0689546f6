"""Operator tools: the process launcher, the CLI, bootstrap, the audit and integrity checks."""
