"""The service's HTTP surface, one router per concern; `triggers.app.create_app` includes them."""
