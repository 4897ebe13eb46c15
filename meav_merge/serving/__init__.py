"""``meav serve``: one base model in memory, any mix of alignment vectors per request,
behind an OpenAI-compatible HTTP API (FastAPI + uvicorn)."""
