"""Event intake: the CLI today; webhooks, drift events and the job queue build on it."""
