"""Serving the ONNX model with onnxruntime: predictor, HTTP server, Open Inference Protocol, registry follower."""
