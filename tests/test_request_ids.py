"""The gateway's request ids: their shape, their order, and that none repeats."""

from __future__ import annotations

import re
import time

from gateway import ids
from gateway.context import request_id
from gateway.server import fresh_ids

SHAPE = re.compile(r"^req_[0-9a-f]{24}$")


def test_an_id_is_req_and_24_hex_digits_led_by_the_time_in_ms() -> None:
    before = time.time_ns() // 1_000_000
    made = ids.request_id()
    after = time.time_ns() // 1_000_000
    assert SHAPE.match(made)
    assert before <= int(made[4:16], 16) <= after


def test_ids_made_later_sort_later_and_none_repeats() -> None:
    made = []
    for _ in range(5):
        made += [ids.request_id() for _ in range(2000)]
        time.sleep(0.002)
    assert len(set(made)) == len(made)
    # within a millisecond the order is random; across milliseconds it is the order made
    stamps = [m[4:16] for m in made]
    assert stamps == sorted(stamps)
    assert made[0] < made[-1]


def test_every_answer_gets_one_unless_the_client_sent_a_sane_one() -> None:
    assert SHAPE.match(request_id(None)) and SHAPE.match(request_id("bad id with spaces"))
    assert request_id("client-42") == "client-42"
    assert SHAPE.match(fresh_ids()["x-request-id"])


def test_a_client_id_of_dots_only_is_replaced_as_no_admin_url_could_name_it() -> None:
    for dots in (".", "..", "..."):
        assert SHAPE.match(request_id(dots))
    assert request_id("a.b") == "a.b"
