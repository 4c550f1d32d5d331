"""The loop around the pipeline: DVC experiments, the promotion gate, the model registry."""
