"""A cached response and its byte size."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from gateway.usage import Usage

# headers of the original response that a replay repeats
KEPT_HEADERS = frozenset({"content-type", "openai-processing-ms", "x-upstream-request-id"})


@dataclass(frozen=True, slots=True)
class CacheEntry:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes  # the JSON body, or the recorded SSE bytes of a stream
    stream: bool
    team: str
    model: str
    usage: Usage | None
    created_at: float  # unix seconds

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 200

    def to_bytes(self) -> bytes:
        u = self.usage
        meta = orjson.dumps(
            {
                "status": self.status,
                "headers": self.headers,
                "stream": self.stream,
                "team": self.team,
                "model": self.model,
                "created_at": self.created_at,
                "usage": None
                if u is None
                else [
                    u.input_tokens,
                    u.output_tokens,
                    u.total_tokens,
                    u.cached_tokens,
                    u.reasoning_tokens,
                ],
            }
        )
        return len(meta).to_bytes(4, "big") + meta + self.body

    @classmethod
    def from_bytes(cls, raw: bytes) -> CacheEntry:
        n = int.from_bytes(raw[:4], "big")
        meta = orjson.loads(raw[4 : 4 + n])
        u = meta["usage"]
        return cls(
            status=meta["status"],
            headers=tuple((k, v) for k, v in meta["headers"]),
            body=raw[4 + n :],
            stream=meta["stream"],
            team=meta["team"],
            model=meta["model"],
            usage=None if u is None else Usage(*u),
            created_at=meta["created_at"],
        )
