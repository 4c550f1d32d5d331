"""The baseline of `cnnpipe bench serve`: the FastAPI + onnxruntime handler a user writes in twenty lines
(decode, normalize, run inline, return the top label; no batching). Run: CNNPIPE_MODEL=model.onnx uvicorn
cnnpipe.bench.baseline:app"""

import io
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from PIL import Image

session = ort.InferenceSession(os.environ["CNNPIPE_MODEL"], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
classes = json.loads(meta["cnnpipe.classes"])
channels, height, width = json.loads(meta["cnnpipe.input_shape"])
mean = np.array(json.loads(meta["cnnpipe.mean"]), np.float32).reshape(-1, 1, 1)
std = np.array(json.loads(meta["cnnpipe.std"]), np.float32).reshape(-1, 1, 1)
input_name = session.get_inputs()[0].name
app = FastAPI()


@app.post("/predict")
async def predict(request: Request):
    image = Image.open(io.BytesIO(await request.body())).convert("L" if channels == 1 else "RGB")
    pixels = np.asarray(image.resize((width, height)), np.float32).reshape(height, width, channels)
    x = (pixels.transpose(2, 0, 1) / 255 - mean) / std
    logits = session.run(None, {input_name: x[None].astype(np.float32)})[0][0]
    return {"label": classes[int(logits.argmax())]}
