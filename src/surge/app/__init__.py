"""The surge web app: accounts, chat and knowledge bases for many users, on the service's own
OpenAI-compatible HTTP API (it is a client of it like any other)."""
