"""Unit tests of chatbot/bus/."""
