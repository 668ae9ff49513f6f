"""Event intake: GitHub webhooks (webhooks.py, changes.py, deliveries.py). Drift events have their own room
(triggers/drift/). Everything here verifies, decides and records; jobs run elsewhere."""
