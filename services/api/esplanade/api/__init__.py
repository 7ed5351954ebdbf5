"""The management REST API (FastAPI): the one front door of the platform."""
