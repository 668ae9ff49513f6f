"""Event intake: GitHub webhooks (webhooks.py, changes.py, deliveries.py) and drift events (drift.py,
drift_consumer.py). Everything here verifies, decides and records; jobs run elsewhere."""
