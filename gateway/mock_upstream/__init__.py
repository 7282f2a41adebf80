"""A fake OpenAI-compatible provider for the demo, the tests and the benchmark.

The mock serves the Responses API, Chat Completions, the model list and a catch-all echo,
with deterministic text and usage, realistic SSE event sequences, per-request fault knobs
(``x-mock-*`` request headers), stateful faults (``/mock/faults``, ``x-mock-fail-first``,
refused keys, a fail ratio; see ``faults``) and a request recorder (``MockState`` under
``MOCK_STATE``).

Output text is a pure function of the input text: the same request always gets the same words
and usage, only the ids differ. Usage arithmetic:
``input_tokens = max(1, ceil(chars / 4))`` over instructions plus every input text,
``output_tokens = N + reasoning`` where ``N`` is the number of words produced.

A request that offers function ``tools`` and whose user input names one of them (as a whole
word) gets a function call instead of text, with arguments built from the tool's schema; a
request whose input ends with a tool's result gets text again. The rule, the arguments and the
usage of a call are in ``tools``.

Modules:
    state      options, per-app state and runtime, the request recorder
    text       the word list, hashing, token counting (deterministic text and usage)
    faults     stateful faults: next-N errors, resets, cuts, refused keys, the fail ratio
    knobs      the ``x-mock-*`` headers and the record-and-faults middleware
    replies    ids, JSON and error replies, body and model checks
    stream     SSE framing and the paced stream writer
    objects    the Response object, its terminal forms, the usage blocks of both APIs
    tools      when to answer with a function call, its arguments and usage
    calls      Responses function calls: the output item, JSON and the SSE event sequence
    responses  the Responses API: text answers, the SSE event sequence, the routes
    chat       Chat Completions: text or tool calls, JSON and chunk stream
    control    the ``/mock/`` control routes: queue and clear faults, refuse keys
    app        the app factory, the models and echo routes, and the runners
"""

from gateway.mock_upstream.app import create_mock_app, run_mock, start_mock
from gateway.mock_upstream.faults import Fault, Faults
from gateway.mock_upstream.state import MOCK_STATE, MockOptions, MockState, RecordedRequest

__all__ = [
    "MOCK_STATE",
    "Fault",
    "Faults",
    "MockOptions",
    "MockState",
    "RecordedRequest",
    "create_mock_app",
    "run_mock",
    "start_mock",
]
