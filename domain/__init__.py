"""The write side: event-sourced aggregates (`User`, `Persona`, `Conversation`) and the
`ChatApplication` that loads, commands and saves them. No I/O lives in the aggregates."""
