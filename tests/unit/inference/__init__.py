"""Unit tests of chatbot/inference/."""
