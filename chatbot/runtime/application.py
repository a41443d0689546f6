"""The application as every process builds it from its settings: the event store's
environment, the models the repository serves, and the prompt window of the worker's
prompt builder (one way of counting a prompt, chatbot/inference/prompt.py)."""

from __future__ import annotations

from chatbot.inference.prompt import PromptBuilder
from chatbot.inference.repository import served_models
from chatbot.runtime.config import Settings
from domain.application import ChatApplication


def chat_application(settings: Settings, create_tables: bool = False) -> ChatApplication:
    return ChatApplication(
        env=settings.eventsourcing_env(create_tables), max_message_chars=settings.max_message_chars,
        served_models=lambda: served_models(settings.model_repository),
        prompt_window=PromptBuilder(settings.model_repository),
    )
