"""Unit tests of chatbot/training/."""
