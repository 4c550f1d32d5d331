"""Predictor: an ONNX model exported by cnnpipe, run with onnxruntime alone (no torch import here).

The ONNX metadata carries class names, input shape and normalization, so a Predictor needs only the file.
Images arrive as numpy arrays (pixel values 0-255; H×W, H×W×C or a batch of those), PIL images or encoded
image bytes (PNG, JPEG, ...); they get the training preprocessing: channel conversion, resize, normalization.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.onnx_io import choose_providers, read_metadata, session_options
from cnnpipe.core.own_images import IMAGE_FORMATS, convert_image, open_image


def first_line(e: Exception) -> str:
    """An exception's message in one short line (its type where it has no message)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


class InputError(ValueError):
    """An image the model cannot take; the message says why (the server answers 4xx with it)."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise probabilities of N×K logits."""
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def declared_pixels(image: Any) -> int:
    """Pixels an image says it has, read from its header (encoded bytes) or shape (arrays), without decoding
    it; 0 when that cannot be told (the decoder then gives the real error)."""
    return open_header(image)[0]


def open_header(image: Any) -> tuple[int, Any]:
    """(declared pixels, the image to decode): encoded bytes are opened once, header only, and the opened
    image is returned for to_pixels to decode; anything else comes back as it is."""
    from PIL import Image

    if isinstance(image, bytes | bytearray | memoryview):
        try:
            opened = open_image(io.BytesIO(image))
            return opened.size[0] * opened.size[1], opened
        except Image.DecompressionBombError as e:  # Pillow refuses to open far larger images at all
            found = re.search(r"\((\d+) pixels\)", str(e))
            return (int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1), image
        except Exception:  # unreadable or hostile headers: left to the decoder's checks
            return 0, image
    if isinstance(image, Image.Image):
        return image.size[0] * image.size[1], image
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) == 3 and shape[0] in (1, 3) and shape[2] not in (1, 3):  # C×H×W, as _array_to_pixels reads it
        return int(shape[1] * shape[2]), image
    return (int(shape[0] * shape[1]) if len(shape) >= 2 else 0), image


class Scores(NamedTuple):
    logits: np.ndarray  # N×K
    probs: np.ndarray  # N×K softmax
    order: np.ndarray  # N×K class indices, most probable first


@dataclass(frozen=True)
class ModelInfo:
    classes: list[str]
    input_shape: tuple[int, int, int]  # C, H, W
    mean: list[float]
    std: list[float]
    model: str
    dataset: str
    opset: int
    sha256: str
    input_name: str


def read_model_info(path: Path, model_proto_bytes: bytes, meta: dict[str, str], input_name: str,
                    opset: int) -> ModelInfo:
    m = read_metadata(meta, path)
    return ModelInfo(classes=m.classes, input_shape=m.input_shape, mean=m.mean, std=m.std, model=m.model,
                     dataset=m.dataset, opset=opset, sha256=hashlib.sha256(model_proto_bytes).hexdigest(),
                     input_name=input_name)


class Predictor:
    """Top-k predictions from an exported cnnpipe ONNX model."""

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CnnpipeError(f"{path}: model file not found; run `dvc repro export` or pass the .onnx path")
        raw = path.read_bytes()
        try:
            self.session = ort.InferenceSession(raw, sess_options=session_options(threads),
                                                providers=choose_providers(providers))
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise CnnpipeError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:160]})") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        opset = _opset_of(raw)
        self.info = read_model_info(path, raw, meta, self.session.get_inputs()[0].name, opset)
        self.path = path
        self.threads = threads or (os.cpu_count() or 1)  # onnxruntime's intra-op threads
        std = np.asarray(self.info.std, np.float32).reshape(1, -1, 1, 1)
        self._scale = (1 / (255 * std)).astype(np.float32)
        self._shift = (-np.asarray(self.info.mean, np.float32).reshape(1, -1, 1, 1) / std).astype(np.float32)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    # --- preprocessing -------------------------------------------------------------------------------
    def to_pixels(self, image: Any, resize: bool = True, max_pixels: int | None = None) -> np.ndarray:
        """One image -> C×H×W float32 pixels (0-255) of the model's shape. With `max_pixels`, an image whose
        header or shape declares more pixels is refused before it is decoded."""
        from PIL import Image, UnidentifiedImageError

        c, h, w = self.info.input_shape
        if max_pixels is not None:
            self.check_pixels(declared_pixels(image), max_pixels)
        if isinstance(image, bytes | bytearray | memoryview):
            if len(image) == 0:
                raise InputError("empty image data")
            try:
                image = open_image(io.BytesIO(image))
                image.load()
            except UnidentifiedImageError as e:  # its message holds the buffer's address: no help to a client
                raise InputError(f"not a readable image (not {', '.join(IMAGE_FORMATS)})") from e
            except Exception as e:  # Pillow's decoders raise many types on damaged or hostile data
                raise InputError(f"not a readable image ({first_line(e)})") from e
        if isinstance(image, Image.Image):
            mode = "L" if c == 1 else "RGB"
            try:
                image.load()
                image = convert_image(image, mode)
            except Exception as e:  # an opened header whose data is broken
                raise InputError(f"not a readable image ({first_line(e)})") from e
            if image.size != (w, h):
                if not resize:
                    raise InputError(f"image is {image.size[0]}×{image.size[1]}, the model takes {w}×{h}")
                image = image.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(image, dtype=np.float32)
            return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return self._array_to_pixels(np.asarray(image), resize)

    def check_pixels(self, declared: int, max_pixels: int) -> None:
        """Refuse an image that declares more than `max_pixels` pixels (see declared_pixels)."""
        if declared > max_pixels:
            _, h, w = self.info.input_shape
            raise InputError(f"image has {declared} pixels, over the limit of {max_pixels}; send it downscaled "
                             f"(the model takes {w}×{h})")

    def _array_to_pixels(self, arr: np.ndarray, resize: bool) -> np.ndarray:
        from PIL import Image

        c, h, w = self.info.input_shape
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise InputError("pixel array must hold numbers")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise InputError("pixel array holds NaN or infinite values")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InputError(f"pixel values must be within 0-255, got {arr.min():g} to {arr.max():g}")
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
            arr = arr.transpose(1, 2, 0)  # C×H×W -> H×W×C
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = np.ascontiguousarray(arr[:, :, :3])  # RGBA: alpha dropped, as PIL's RGBA -> RGB conversion does
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or 0 in arr.shape[:2]:
            raise InputError(f"pixel array of shape {list(arr.shape)} is not an image; send H×W or H×W×3 (or C×H×W; "
                             "several images as a list or an N×C×H×W array)")
        channels = 1 if arr.ndim == 2 else 3
        if channels != c:
            if c == 1:
                arr = arr @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 luma, as PIL's "L"
            else:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.shape[:2] != (h, w):
            if not resize:
                raise InputError(f"image is {arr.shape[1]}×{arr.shape[0]}, the model takes {w}×{h}")
            planes = arr[:, :, None] if arr.ndim == 2 else arr
            arr = np.stack([np.asarray(Image.fromarray(planes[:, :, i]).resize((w, h), Image.Resampling.BILINEAR))
                            for i in range(planes.shape[2])], axis=2)
            arr = arr[:, :, 0] if c == 1 else arr
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def preprocess(self, images: Sequence[Any], resize: bool = True, max_pixels: int | None = None) -> np.ndarray:
        """Images -> N×C×H×W float32, normalized as in training."""
        if len(images) == 0:
            return np.zeros((0, *self.info.input_shape), np.float32)
        if len(images) == 1:
            pixels = self.to_pixels(images[0], resize, max_pixels)[None]
        else:
            pixels = np.stack([self.to_pixels(im, resize, max_pixels) for im in images])
        return pixels * self._scale + self._shift  # (pixels/255 - mean) / std, as normalize_pixels

    # --- inference -----------------------------------------------------------------------------------
    def logits(self, x: np.ndarray) -> np.ndarray:
        """N×C×H×W normalized float32 -> N×K logits."""
        if len(x) == 0:
            return np.zeros((0, len(self.info.classes)), np.float32)
        return self.session.run(None, {self.info.input_name: x})[0]

    def scores(self, x: np.ndarray) -> Scores:
        """Logits, probabilities and classes ranked by probability, for a batch (one pass over all rows)."""
        logits = self.logits(x)
        probs = softmax(logits)
        return Scores(logits, probs, np.argsort(-probs, axis=1, kind="stable"))

    def top_k(self, logits: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
        probs = softmax(logits)
        return self.ranked(Scores(logits, probs, np.argsort(-probs, axis=1, kind="stable")), k)

    def ranked(self, scores: Scores, k: int = 5) -> list[list[dict[str, Any]]]:
        """The k most probable classes of each row: label, index, probability (rounded to 6 places)."""
        k = max(1, min(k, scores.probs.shape[1]))
        classes = self.info.classes
        return [[{"label": classes[j], "index": j, "probability": round(p[j], 6)} for j in row]
                for p, row in zip(scores.probs.tolist(), scores.order[:, :k].tolist(), strict=True)]

    def predict(self, images: Any, k: int = 5, resize: bool = True) -> list[list[dict[str, Any]]]:
        """Top-k labels and probabilities for each image (a single image gives a one-element list). `images`:
        one image (encoded bytes, a PIL image, an H×W, H×W×C or C×H×W array), a list of them, or a 4-D array
        batch (N×C×H×W or N×H×W×C). A grayscale model refuses a 3×H×W array: one colour image or three?"""
        if (isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[0] == 3 and 0 not in images.shape
                and images.shape[2] not in (1, 3) and self.info.input_shape[0] == 1):
            raise InputError(f"a {'×'.join(map(str, images.shape))} array is one colour image (C×H×W) or three "
                             "grayscale images: pass the one as H×W×3, the three as 3×1×H×W or a list of H×W arrays")
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)  # a batch: N×C×H×W or N×H×W×C
        elif not isinstance(images, list | tuple):
            images = [images]
        return self.top_k(self.logits(self.preprocess(images, resize)), k)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message's top-level fields; length-delimited values are
    bytes, the others ints."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i: i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = int.from_bytes(buf[i: i + size], "little"), i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _opset_of(raw: bytes) -> int:
    """The default-domain opset of a serialized ONNX ModelProto (field 8: OperatorSetIdProto{1: domain,
    2: version}), read without the onnx package so that serving needs onnxruntime alone; 0 if unknown
    (e.g. onnxruntime's own .ort format)."""
    try:
        for number, wire, value in _fields(memoryview(raw)):
            if number == 8 and wire == 2:
                entry = {n: v for n, _, v in _fields(value)}
                if bytes(entry.get(1, b"")) in (b"", b"ai.onnx"):
                    return int(entry.get(2, 0))
    except (IndexError, ValueError):
        pass
    return 0
