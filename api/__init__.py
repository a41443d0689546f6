"""The Litestar API: REST resources, the websocket chat protocol, the chat page."""
