"""The stage deployments (AR over ``AsyncLLM``, DiT over ``AsyncDiTEngine``), the replica base they
share, and the AR stage's pinned routing."""
