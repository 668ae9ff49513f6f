"""Serving the production model: the HTTP server with hot swap (server.py) and its inference log."""
