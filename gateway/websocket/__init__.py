"""The Responses API's WebSocket mode: one persistent connection, many responses."""
