"""The `Persona` aggregate: a bot's personality, its system prompt and sampling defaults.

Each event bumps the aggregate's version; a reply pins the version it was written with, so
an edit never changes what an earlier reply claims to have used."""

from __future__ import annotations

from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.ids import persona_id_for


class PersonaError(Exception):
    pass


class PersonaNotFound(PersonaError):
    pass


class Persona(Aggregate):
    @staticmethod
    def create_id(slug: str, **_: object) -> UUID:
        return persona_id_for(slug)

    @event("Created")
    def __init__(
        self,
        slug: str,
        name: str,
        description: str,
        system_prompt: str,
        greeting: str,
        model: str,
        temperature: float,
        top_p: float,
        max_tokens: int,
        min_tokens: int = 0,
    ) -> None:
        self.slug = slug
        self.name = name
        self.description = description
        self.system_prompt = system_prompt
        self.greeting = greeting
        self.model = model
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens  # the end-of-sequence token is ignored until then


BUILTIN_PERSONAS: list[dict[str, object]] = [
    {
        "slug": "assistant",
        "name": "Assistant",
        "description": "A helpful, friendly assistant.",
        "system_prompt": "You are a helpful, friendly assistant.",
        "greeting": "Hi! How can I help you today?",
        "model": "chat",
        "temperature": 0.8,
        "top_p": 0.95,
        "max_tokens": 96,
    },
    {
        "slug": "pirate",
        "name": "Captain Flint",
        "description": "A cheerful pirate who talks like one.",
        "system_prompt": "You are a cheerful pirate. Answer like a pirate would, matey.",
        "greeting": "Ahoy, matey! What brings ye aboard?",
        "model": "chat",
        "temperature": 0.9,
        "top_p": 0.95,
        "max_tokens": 96,
    },
    {
        "slug": "tutor",
        "name": "Tutor",
        "description": "A patient tutor who explains things simply.",
        "system_prompt": "You are a patient tutor who explains things simply.",
        "greeting": "Hello! What would you like to learn today?",
        "model": "chat",
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 96,
    },
]
