"""OpenAI-compatible serving: every budget of one checkpoint from one copy of the weights.

``app`` holds the routes and responses, ``api`` the prompts and the requests it makes of the
scheduler, ``validate`` every field's check and the OpenAI-shaped errors; ``scheduler`` the
continuous batching per budget and ``model: "auto"``, ``several`` the budget-schedule and
speculative calls, ``metrics`` the access log and the Prometheus metrics (``/metrics``).
:func:`nestlm.serve.server.build_api` puts them together for a model directory;
:func:`~nestlm.serve.server.run` serves it with uvicorn (:func:`~nestlm.serve.server.bind` takes
the address first).
"""
