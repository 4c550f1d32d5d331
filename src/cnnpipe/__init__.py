"""cnnpipe: train CNN image classifiers through a DVC pipeline and serve them with onnxruntime."""

__version__ = "0.1.0"
