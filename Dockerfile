# The serving image: the base install of cnnpipe (onnxruntime, FastAPI, uvicorn; no torch, DVC or Prefect),
# uv.lock's serving pins (requirements/serve.txt, hash-checked), then the project: the commands
# tests/func/test_serving_install.py runs into a fresh venv.
#   dvc repro export && docker build -t cnnpipe-serve . && docker run -p 8000:8000 cnnpipe-serve
FROM python:3.11-slim
WORKDIR /app
COPY requirements/serve.txt ./requirements/
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements/serve.txt
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps . && rm -rf /app/src
COPY models/model.onnx /models/model.onnx
EXPOSE 8000
USER nobody
CMD ["cnnpipe", "serve", "/models/model.onnx", "--host", "0.0.0.0", "--port", "8000"]
