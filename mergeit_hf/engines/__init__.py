"""Engines run the stages over a dataset: today Hugging Face ``datasets`` (one machine)."""
