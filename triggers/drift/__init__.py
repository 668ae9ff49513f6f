"""Drift, in one room: the monitor that compares a window of fresh data with a version's reference
(monitor.py; embeddings.py for images and text), the drift events it sends and the service's decision on
each (events.py), and the Kafka consumer that takes them in (consumer.py)."""
