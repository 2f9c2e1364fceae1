"""Triton, or stand-ins on installs without it (CPU-only torch wheels), so the PyTorch references still import.

The stand-ins only let the kernel definitions parse: ``triton.jit`` returns the function unchanged and
``tl.constexpr`` is a plain annotation. Nothing launches a kernel unless ``HAS_TRITON``.
"""
from types import SimpleNamespace

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=object)

__all__ = ["HAS_TRITON", "triton", "tl"]
