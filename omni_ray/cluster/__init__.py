"""Ray-side services of an application: the admission scheduler actor (``admission/``), the DiT
cache actor (``dit_cache.py``), the worker groups that hold parallel ranks (``worker_group.py``),
and the named-actor helper they share (``named_actor.py``)."""
