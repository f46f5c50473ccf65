"""The OpenAI wire format: request bodies (``protocol.py``) and response bodies and chunks (``responses.py``)."""
