"""The HTTP server: FastAPI app and the static web gallery."""
