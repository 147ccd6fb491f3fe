"""The OpenAI-compatible server: a continuous-batching engine (engine.py) behind a FastAPI app (app.py)."""
