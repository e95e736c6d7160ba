"""`mechvis serve`: the interactive inference visualiser (FastAPI app, plain ES modules)."""

from mechvis.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
