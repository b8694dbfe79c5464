"""OpenAI-compatible serving: every budget of one checkpoint from one copy of the weights.

``app`` holds the routes, validation and OpenAI-shaped errors; ``scheduler`` the continuous
batching per budget and ``model: "auto"``. :func:`nestlm.serve.server.build_api` puts them together for a model
directory; :func:`~nestlm.serve.server.run` serves it with uvicorn.
"""
