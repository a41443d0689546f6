"""What the `chat` model and its clients agree on about errors (no torch import here)."""

from __future__ import annotations

# Errors caused by the request's own input start with this prefix: retrying cannot help,
# so the worker fails the reply at once and the OpenAI API answers 400.
INVALID_REQUEST = "invalid request: "
