"""Unit tests of chatbot/ops/ and deploy/."""
