"""OpenAI-compatible HTTP server around the engine (`llmos-worker serve`).

Modules, from the wire inwards: `main` (the command, uvicorn, SIGTERM drain), `app` (routes,
probes, body parsing), `completions` and `chat` (the two OpenAI endpoints), `protocol` (request
bodies) and `response` (response bodies and stream chunks), `errors` (one error shape),
`admission` with `auth` and `ratelimit` (who calls and whether they may), `generation` (one HTTP
request's engine requests and stream deltas), `async_engine` (the engine's step loop in its own
thread), `metrics` (Prometheus) and `state` (what the handlers share). Names are imported from
their modules; this package re-exports nothing, so importing `server.auth` never pulls in the app.
"""
