"""The control-plane HTTP API (FastAPI): one router per resource."""
