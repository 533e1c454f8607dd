"""e2ediff: end-to-end training of few-step diffusion models (E2EDiff, arXiv 2412.21044)."""

__version__ = "0.1.0"
