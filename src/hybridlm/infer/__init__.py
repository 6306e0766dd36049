"""Inference: sampling text from a trained model."""
