"""A small test client for the REST API and the websocket chat protocol, and a look at
the event stream's cluster (`stream_leader`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from tests.waiting import async_eventually


class ChatClient:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30)
        self.token: str | None = None
        self.email = f"user-{uuid.uuid4().hex[:12]}@example.com"
        self.password = "correct horse battery"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def register_and_log_in(self) -> None:
        r = await self.http.post("/api/auth/register", json={"email": self.email, "password": self.password})
        assert r.status_code == 201, r.text
        self.user_id = r.json()["user_id"]
        r = await self.http.post("/api/auth/login", json={"email": self.email, "password": self.password})
        assert r.status_code == 200, r.text
        self.token = r.json()["token"]

    async def start_conversation(self, persona_id: str | None = None) -> str:
        body = {"persona_id": persona_id} if persona_id else {}
        r = await self.http.post("/api/conversations", json=body, headers=self.headers)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(path, headers=self.headers)

    async def messages_when(self, conversation_id: str, ready: Any, timeout: float = 10) -> list[dict[str, Any]]:
        """Poll the read model until `ready(messages)` (it is eventually consistent); the
        messages then, or those at the deadline (the caller judges them)."""
        async def messages() -> list[dict[str, Any]]:
            r = await self.get(f"/api/conversations/{conversation_id}/messages")
            assert r.status_code == 200, r.text
            return list(r.json())

        return await async_eventually(messages, until=ready, timeout=timeout, interval=0.05,
                                      what=f"the messages of {conversation_id}", fail=False)

    async def titles_when_shown(self, chat_app: Any, conversation_id: str, timeout: float = 10) -> list[str]:
        """Every title the conversation's events record (`Titled`: the rule's after the first
        reply, then maybe the model's), once the conversation list shows the newest of them."""
        async def titles_and_listed() -> tuple[list[str], str | None]:
            titles = [e.title for e in chat_app.events.get(uuid.UUID(conversation_id)) if type(e).__name__ == "Titled"]
            listed = {c["id"]: c["title"] for c in (await self.get("/api/conversations")).json()}
            return titles, listed.get(conversation_id)

        titles, _ = await async_eventually(
            titles_and_listed, until=lambda tl: bool(tl[0]) and tl[1] == tl[0][-1], timeout=timeout, interval=0.05,
            what=f"the newest title of {conversation_id} listed (titles, listed)")
        return titles

    def ws(self, **kwargs: Any) -> Any:
        url = self.base_url.replace("http://", "ws://") + "/api/ws"
        return connect(url, additional_headers=self.headers, max_size=None, **kwargs)

    async def close(self) -> None:
        await self.http.aclose()


async def recv(ws: ClientConnection, timeout: float = 60) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def send(ws: ClientConnection, conversation_id: str, text: str, client_message_id: str | None = None) -> str:
    cmid = client_message_id or str(uuid.uuid4())
    await ws.send(json.dumps({
        "type": "send", "conversation_id": conversation_id, "client_message_id": cmid, "text": text,
    }))
    return cmid


async def collect_reply(
    ws: ClientConnection, timeout: float = 120, reply_id: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Read frames until the final `reply`: returns (accepted, token frames, reply).

    A socket follows whole conversations, so frames of other replies may come in between (an
    earlier reply's end announced again after a worker's redelivery): once the reply wanted is
    known (`reply_id`, else the `accepted` frame's) only its frames count. Without either, the
    first reply to end is returned."""
    accepted: dict[str, Any] = {}
    tokens: dict[str, list[dict[str, Any]]] = {}
    ended: dict[str, dict[str, Any]] = {}
    while True:
        frame = await recv(ws, timeout)
        if frame["type"] == "accepted":
            accepted = frame
            reply_id = reply_id or frame["reply_id"]
        elif frame["type"] == "token":
            tokens.setdefault(frame["reply_id"], []).append(frame)
        elif frame["type"] == "reply":
            if reply_id is None:
                return accepted, tokens.get(frame["reply_id"], []), frame
            ended[frame["reply_id"]] = frame
        elif frame["type"] == "error" and frame.get("reply_id") in (None, reply_id):
            raise AssertionError(f"unexpected error frame: {frame}")
        if reply_id is not None and reply_id in ended:
            return accepted, tokens.get(reply_id, []), ended[reply_id]


async def stream_leader(js: Any, stream: str, not_this: str = "", timeout: float = 30.0) -> str:
    """The node leading the JetStream stream, once there is one other than `not_this` (a
    node just killed: two of three replicas elect another). TimeoutError (NotInTime) if none comes."""
    async def leader() -> str | None:
        info = await js.stream_info(stream)
        if info.cluster and info.cluster.leader and info.cluster.leader != not_this:
            return str(info.cluster.leader)
        return None

    found = await async_eventually(leader, timeout=timeout, interval=0.3, ignore=(Exception,),  # no leader for a moment
                                   what=f"a leader of stream {stream} other than {not_this!r}")
    return str(found)
