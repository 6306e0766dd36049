"""Training: run configuration, tokenizers, packed data, optimizer and schedule, metrics, the trainer."""
