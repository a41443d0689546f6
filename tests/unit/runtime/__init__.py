"""Unit tests of chatbot/runtime/."""
