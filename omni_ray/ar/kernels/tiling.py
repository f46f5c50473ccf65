"""Tile sizes of the Triton kernels that callers outside them plan with (importable without Triton)."""


def prefill_block_m(head_dim: int) -> int:
    """Query rows per program of the Triton prefill kernel (what a ``q_blocks`` table counts in)."""
    return 64 if head_dim <= 128 else 32
