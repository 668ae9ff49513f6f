"""GitHub: the API reads and writes (api.py) and the job reporter (reporter.py)."""
