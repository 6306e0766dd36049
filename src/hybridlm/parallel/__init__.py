"""Parallelism and execution choices applied to a built model from outside (the model never imports this)."""
