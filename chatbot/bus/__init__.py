"""NATS JetStream: the event stream's subjects, and the token channel that streams replies."""
