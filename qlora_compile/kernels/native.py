"""Native CPU kernels (placeholder until built)."""


def available() -> bool:
    return False
