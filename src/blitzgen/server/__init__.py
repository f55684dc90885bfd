"""The OpenAI-compatible HTTP server: ``protocol`` (wire format), ``engine`` (the one worker thread that
owns the model), ``metrics`` (Prometheus), ``app`` (FastAPI routes) and ``static/index.html`` (chat page).

Importing this package needs nothing beyond blitzgen; ``app`` and ``metrics`` need the ``serve`` extras
(fastapi, uvicorn, prometheus_client).
"""
