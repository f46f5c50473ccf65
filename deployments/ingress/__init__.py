"""The ingress deployment (``ingress.py``: one class, HTTP routes and Python methods) and the plain
modules it calls: request lifecycle, admission, the Gate, errors over HTTP, stage calls, timing."""
