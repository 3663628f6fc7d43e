"""Aiguillage: one OpenAI-compatible API in front of pooled GPU servers."""

__version__ = "0.1.0"
