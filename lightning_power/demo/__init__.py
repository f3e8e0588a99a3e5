"""A real demo: a byte-level GPT and a byte corpus (the Python standard library's own sources by default)."""

from lightning_power.demo.data import ByteCorpus
from lightning_power.demo.gpt import GPT

__all__ = ["GPT", "ByteCorpus"]
