"""The errors of the `Conversation` aggregate (domain/conversation.py) and of the commands on
it: every one a `ConversationError`."""


class ConversationError(Exception):
    pass


class ConversationNotFound(ConversationError):
    pass


class PersonaUnavailable(ConversationError):
    """The conversation's persona was retired, or made private by its creator, since the
    conversation started: it answers no more messages there."""


class EmptyMessage(ConversationError):
    pass


class MessageTooLong(ConversationError):
    pass


class InvalidCharacters(ConversationError):
    """Text with NUL (U+0000), which PostgreSQL text columns (the read models) cannot hold."""


class ReplyNotFound(ConversationError):
    pass


class ReplyAlreadyFinished(ConversationError):
    pass


class ReplyStillPending(ConversationError):
    pass


class InvalidFeedback(ConversationError):
    pass



class InvalidTurns(ConversationError):
    pass


class InvalidSampling(ConversationError):
    pass


class MessageNotFound(ConversationError):
    pass


class InvalidTitle(ConversationError):
    pass


class ShareNotFound(ConversationError):
    pass


class InvalidRetention(ConversationError):
    pass

