"""What crosses the cloud–device boundary, in one place (docs/protocol.md tells the story).

* `messages` — the pydantic request and response bodies of the /v1 HTTP API.
* `events` — the typed NDJSON events of a session's stream (`start`, `side_request`, `token`,
  `done`): the cloud builds them, the device parses them, both through these models.
* `wire` — the binary encodings: raw little-endian taps and g(x), safetensors payloads.

`cloud_api` and `device_agent` both import this package; it imports neither (tests/test_layout.py).
The cloud reports `PROTOCOL_VERSION` in `GET /v1/info`; a device refuses a cloud that speaks
another one.
"""

#: bumped when a message or event changes incompatibly (the URL prefix /v1 is its major version)
PROTOCOL_VERSION = "1"
