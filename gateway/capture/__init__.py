"""Capture: the bodies of sampled and failed requests, kept for debugging (CONTRACT section 11).

- `rule`: at admission, whether a request may be captured (team globs, the sample draw).
- `tap`: the tap that holds the answer's bytes, cut, until `finish` knows the outcome.
- `draft`: what `finish` hands over (references, no copies); `render` redacts and
  serialises it, off the request path.
- `writer`: the bounded queue and the batch writer in front of a `CaptureStore`.
- `store`, `sqlite`, `postgres`: where captures live (the ledger's database).
"""
