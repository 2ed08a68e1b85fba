"""Runnable examples (python -m savae_fast.examples.<name>)."""
