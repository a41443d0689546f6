"""Unit tests of chatbot/eventstore/."""
