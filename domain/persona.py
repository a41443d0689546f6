"""The `Persona` aggregate: a bot's personality, its system prompt and sampling defaults.

Each event bumps the aggregate's version; a reply pins the version it was written with, so
an edit never changes what an earlier reply claims to have used."""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.ids import persona_id_for


class PersonaError(Exception):
    pass


class PersonaNotFound(PersonaError):
    pass


class PersonaVersionNotFound(PersonaNotFound):
    """A version the persona never had (versions count from 1 to the current one)."""


class InvalidPersona(PersonaError):
    pass


class NotPersonaOwner(PersonaError):
    pass


class SlugTaken(PersonaError):
    pass


SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,47}$")
VISIBILITIES = ("private", "public")
# field -> (type, check) for what a user may set on create or edit
LIMITS = {"name": 80, "description": 300, "system_prompt": 4000, "greeting": 500, "avatar": 500, "model": 80}
EDITABLE = (
    "name", "description", "avatar", "system_prompt", "greeting", "starters", "model",
    "temperature", "top_p", "max_tokens", "visibility",
)


def check_fields(fields: dict[str, Any]) -> None:
    """Raise InvalidPersona naming the first field that is out of bounds."""
    for key, limit in LIMITS.items():
        if key in fields and not (isinstance(fields[key], str) and len(fields[key]) <= limit):
            raise InvalidPersona(f"{key} is text of at most {limit} characters")
    if "name" in fields and not fields["name"].strip():
        raise InvalidPersona("a persona needs a name")
    if "system_prompt" in fields and not fields["system_prompt"].strip():
        raise InvalidPersona("a persona needs a system prompt")
    if "temperature" in fields and not 0.0 <= float(fields["temperature"]) <= 2.0:
        raise InvalidPersona("temperature is between 0 and 2")
    if "top_p" in fields and not 0.0 < float(fields["top_p"]) <= 1.0:
        raise InvalidPersona("top_p is above 0 and at most 1")
    if "max_tokens" in fields and not 1 <= int(fields["max_tokens"]) <= 2048:
        raise InvalidPersona("max_tokens is between 1 and 2048")
    if "visibility" in fields and fields["visibility"] not in VISIBILITIES:
        raise InvalidPersona(f"visibility is one of {', '.join(VISIBILITIES)}")
    if "starters" in fields:
        starters = fields["starters"]
        if not isinstance(starters, list) or len(starters) > 6 or any(
            not isinstance(x, str) or not 0 < len(x) <= 200 for x in starters
        ):
            raise InvalidPersona("starters are at most 6 texts of 1 to 200 characters")
    # PostgreSQL text (the read models) cannot hold NUL: refuse it here, not in the projector
    texts = [v for v in fields.values() if isinstance(v, str)] + list(fields.get("starters") or [])
    if any("\x00" in t for t in texts):
        raise InvalidPersona("persona texts cannot contain NUL (U+0000) characters")


def check_slug(slug: str) -> None:
    if not SLUG_RE.match(slug):
        raise InvalidPersona("a slug is 2-48 lowercase letters, digits and dashes")


def render_system_prompt(template: str, variables: dict[str, str]) -> str:
    """Fill `{{name}}` variables; unknown ones stay as written."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: variables.get(m.group(1), m.group(0)), template)


def system_prompt(template: str, user_name: str, instructions: str | None = None) -> str:
    """A conversation's system prompt, the one way it is made: the persona's template with
    `{{user_name}}` filled, then the conversation's own instructions (brought in with an
    import: they extend the persona's). The reply job and the check that a message can fit
    the context window both use it; chatbot/inference/prompt.py fits the turns after it."""
    prompt = render_system_prompt(template, {"user_name": user_name})
    return f"{prompt}\n\n{instructions}" if instructions else prompt


class Persona(Aggregate):
    @staticmethod
    def create_id(slug: str, owner_id: UUID | None = None, **_: object) -> UUID:
        return persona_id_for(slug, owner_id)

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
        owner_id: UUID | None = None,  # None: a built-in persona
        visibility: str = "public",
        avatar: str = "",
        starters: list[str] | None = None,
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
        self.owner_id = owner_id
        self.visibility = visibility
        self.avatar = avatar
        self.starters = list(starters or [])
        self.retired = False

    def edit(self, user_id: UUID, changes: dict[str, Any]) -> None:
        """Change some fields; every edit is a new version of the persona."""
        self.check_owner(user_id)
        unknown = set(changes) - set(EDITABLE)
        if unknown:
            raise InvalidPersona(f"cannot change {', '.join(sorted(unknown))}")
        check_fields(changes)
        changes = {k: v for k, v in changes.items() if getattr(self, k) != v}
        if changes:
            self._edit(changes)

    def changes_back_to(self, earlier: Persona) -> dict[str, Any]:
        """The edit that makes an earlier version's fields current again: only those that
        differ (empty when it is the current one, or equal to it), so a restore is an
        ordinary edit, a new version, and nothing is deleted."""
        return {k: getattr(earlier, k) for k in EDITABLE if getattr(self, k) != getattr(earlier, k)}

    def upgrade_builtin(self, spec: dict[str, Any]) -> None:
        """A built-in persona (no owner) still holding an earlier default of a field takes
        today's default, as a new version; a value anyone chose is left alone."""
        if self.owner_id is not None:
            raise NotPersonaOwner("only built-in personas are upgraded")
        previous = PREVIOUS_BUILTIN.get(self.slug, {})
        changes = {k: spec[k] for k, old in previous.items() if getattr(self, k) in old and getattr(self, k) != spec[k]}
        if changes:
            self._edit(changes)

    def retire(self, user_id: UUID) -> None:
        self.check_owner(user_id)
        if not self.retired:
            self._retire()

    def visible_to(self, user_id: UUID | None) -> bool:
        return not self.retired and (self.visibility == "public" or self.owner_id == user_id)

    def check_owner(self, user_id: UUID) -> None:
        if self.owner_id is None or self.owner_id != user_id:
            raise NotPersonaOwner("only the persona's creator can change it")

    @event("Edited")
    def _edit(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            setattr(self, key, value)

    @event("Retired")
    def _retire(self) -> None:
        self.retired = True

    def snapshot(self) -> dict[str, Any]:
        """The persona's fields at this version, for the API."""
        return {
            "id": self.id, "version": self.version, "slug": self.slug, "name": self.name,
            "description": self.description, "avatar": self.avatar, "system_prompt": self.system_prompt,
            "greeting": self.greeting, "starters": list(self.starters), "model": self.model,
            "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
            "visibility": self.visibility, "owner_id": self.owner_id, "retired": self.retired,
            "updated_at": self.modified_on,
        }


# Earlier defaults of the built-in personas: a built-in persona still holding one of these
# (never edited since) is moved to today's default when personas are seeded.
PREVIOUS_BUILTIN: dict[str, dict[str, list[object]]] = {
    "assistant": {"system_prompt": ["You are a helpful, friendly assistant."], "temperature": [0.8], "top_p": [0.95]},
    "pirate": {"temperature": [0.9], "top_p": [0.95]},
    "tutor": {"temperature": [0.7]},
}
# Sampling: SmolLM2's model card recommends temperature 0.2 and top_p 0.9. At 0.8 the
# assistant answered 22 of bench/quality.py's 41 prompts; the pirate keeps more freedom.

BUILTIN_PERSONAS: list[dict[str, object]] = [
    {
        "slug": "assistant",
        "name": "Assistant",
        "description": "A helpful, friendly assistant.",
        # Chosen on SmolLM2-135M-Instruct: with "You are a helpful, friendly assistant." it
        # answered "What is the capital of France?" in broken French (greedy); with this it
        # answers that, "What is 2 + 2?" and one-word instructions correctly.
        "system_prompt": "You are a friendly AI assistant. Give short, correct answers.",
        "greeting": "Hi! How can I help you today?",
        "avatar": "🙂",
        "starters": ["How are you today?", "What do you like to do on weekends?"],
        "model": "chat",
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 96,
    },
    {
        "slug": "pirate",
        "name": "Captain Flint",
        "description": "A cheerful pirate who talks like one.",
        "system_prompt": "You are a cheerful pirate. Answer like a pirate would, matey.",
        "greeting": "Ahoy, matey! What brings ye aboard?",
        "avatar": "🏴‍☠️",
        "starters": ["Ahoy! Where are we sailing?", "Do you like the sea?"],
        "model": "chat",
        "temperature": 0.6,
        "top_p": 0.9,
        "max_tokens": 96,
    },
    {
        "slug": "tutor",
        "name": "Tutor",
        "description": "A patient tutor who explains things simply.",
        "system_prompt": "You are a patient tutor who explains things simply.",
        "greeting": "Hello! What would you like to learn today?",
        "avatar": "🎓",
        "starters": ["Can you help me with my homework?", "What is your favorite subject?"],
        "model": "chat",
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 96,
    },
]
