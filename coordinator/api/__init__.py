"""The coordinator's HTTP API (FastAPI): `create_app` in main.py."""
