"""The cloud: the frozen backbone served over HTTP (FastAPI + uvicorn)."""
