"""The six DVC stages: download, split, train, evaluate, export, quantize (one module each)."""
