"""cnnpipe: train CNN image classifiers through a DVC pipeline and serve them with onnxruntime."""

__version__ = "0.1.0"
DEFAULT_PARAMS = "params.yaml"  # the settings file every stage reads unless given --params
