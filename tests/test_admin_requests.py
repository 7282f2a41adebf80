"""`GET /admin/requests`, `GET /admin/requests/{id}` and `GET /admin/usage?by=user,tag:KEY`
on a running gateway: what clients sent, found again by an admin."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_KEY, BETA_KEY, Running, auth

BODY = {"model": "nusantara-base", "input": "hi", "max_output_tokens": 8}


async def send(gateway: Running, headers: dict[str, str], key: str | None = None) -> str:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{gateway.url}/v1/responses",
            json=BODY,
            headers={**(auth(key) if key else auth()), **headers},
        ) as r,
    ):
        await r.read()
        return r.headers["x-request-id"]


async def admin(gateway: Running, path: str, key: str = ADMIN_KEY) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gateway.admin_url}{path}", headers=auth(key)) as r,
    ):
        return r.status, await r.json()


@pytest.fixture
async def traffic(gateway: Running) -> list[str]:
    """Five requests: three users, two envs, one refused (403), oldest first."""
    return [
        await send(gateway, {"x-gateway-user": "alice", "x-gateway-tags": "env=prod"}),
        await send(gateway, {"x-gateway-user": "bob", "x-gateway-tags": "env=dev,app=web"}),
        await send(gateway, {"x-gateway-user": "alice"}),
        await send(gateway, {"x-gateway-user": "carol", "x-gateway-tags": "env=prod"}, BETA_KEY),
        await send(gateway, {"x-gateway-tags": "env=prod,app=web"}),
    ]


async def listed(gateway: Running, query: str) -> list[str]:
    status, body = await admin(gateway, f"/admin/requests?{query}")
    assert status == 200, body
    return [r["request_id"] for r in body["requests"]]


async def test_search_filters_newest_first(gateway: Running, traffic: list[str]) -> None:
    a1, b, a2, c, anon = traffic
    assert await listed(gateway, "") == [anon, c, a2, b, a1]
    assert await listed(gateway, "user=alice") == [a2, a1]
    assert await listed(gateway, "tag=env:prod") == [anon, c, a1]
    assert await listed(gateway, "tag=env:prod&tag=app:web") == [anon]
    assert await listed(gateway, "status=4xx") == [c]
    assert await listed(gateway, "status=200&team=alpha") == [anon, a2, b, a1]
    assert await listed(gateway, "team=beta") == [c]
    assert await listed(gateway, "model=nusantara-base&until=2000-01-01") == []
    assert await listed(gateway, "since=2000-01-01&limit=2") == [anon, c]


async def test_pages_follow_next_cursor(gateway: Running, traffic: list[str]) -> None:
    seen: list[str] = []
    query = "limit=2"
    while True:
        status, body = await admin(gateway, f"/admin/requests?{query}")
        assert status == 200 and len(body["requests"]) <= 2
        seen += [r["request_id"] for r in body["requests"]]
        if body["next_cursor"] is None:
            break
        query = f"limit=2&cursor={body['next_cursor']}"
    assert seen == traffic[::-1]


async def test_a_record_shows_attribution_and_no_capture(
    gateway: Running, traffic: list[str]
) -> None:
    status, body = await admin(gateway, "/admin/requests?user=bob")
    row = body["requests"][0]
    assert row["tags"] == {"app": "web", "env": "dev"} and row["captured"] is False
    status, one = await admin(gateway, f"/admin/requests/{traffic[1]}")
    assert status == 200
    assert one["request_id"] == traffic[1] and one["user"] == "bob" and one["capture"] is None
    assert one["tags"] == {"app": "web", "env": "dev"} and one["status"] == 200
    for missing in ("req_nope", "a%20b", "x" * 200):
        status, body = await admin(gateway, f"/admin/requests/{missing}")
        assert status == 404 and body["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "query",
    [
        "cursor=forged",
        "cursor=AAAAAAAAAAAAAAAAAAAAAAA",  # version 0
        "limit=0",
        "limit=501",
        "status=6xx",
        "tag=env",
        "tag=Env:prod",
        "since=yesterday",
        "team=a&team=b",
        "teem=alpha",
        "user=" + "u" * 500,
    ],
)
async def test_bad_parameters_are_400(gateway: Running, query: str) -> None:
    status, body = await admin(gateway, f"/admin/requests?{query}")
    assert status == 400 and body["error"]["code"] == "invalid_parameter"
    assert "forged" not in body["error"]["message"]


async def test_the_admin_key_is_needed(gateway: Running) -> None:
    status, _ = await admin(gateway, "/admin/requests", key="wrong")
    assert status == 401
    status, _ = await admin(gateway, "/admin/requests/req_x", key="wrong")
    assert status == 401


async def test_usage_by_user_and_tag(gateway: Running, traffic: list[str]) -> None:
    status, body = await admin(gateway, "/admin/usage?by=user,tag:env")
    assert status == 200 and body["by"] == ["user", "tag:env"]
    assert [(r["user"], r["tag:env"], r["requests"]) for r in body["rows"]] == [
        ("", "prod", 1),
        ("alice", "", 1),
        ("alice", "prod", 1),
        ("bob", "dev", 1),
        ("carol", "prod", 1),
    ]
    status, body = await admin(gateway, "/admin/usage?by=tag:Bad")
    assert status == 400
