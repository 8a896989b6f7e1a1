# loopgpt server image: CUDA PyTorch runtime + the server and GPU ONNX runtime extras + the demo checkpoint.
#
#   docker build -t loopgpt .
#   docker run --rm --gpus all -p 8000:8000 loopgpt                    # serves checkpoints/demo
#   docker run --rm --gpus all -p 8000:8000 -v "$PWD/my-ckpt:/ckpt:ro" -e LOOPGPT_CHECKPOINT=/ckpt loopgpt
#
# Every `loopgpt serve` flag is also a LOOPGPT_ variable (docs/configuration.md). LOOPGPT_PORT is both the port
# serve listens on and the one the health check probes: change the port with it (-e), not with --port.
#
# The base image already holds a CUDA build of torch, which satisfies our `torch>=2.4`, so pip keeps it.
# Only the `gpu` extra is installed for ONNX: `onnxruntime` and `onnxruntime-gpu` own the same module.
FROM pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOOPGPT_PORT=8000

WORKDIR /app

# Dependencies first (their layer survives source edits): only the files pip needs to resolve them.
COPY pyproject.toml README.md ./
COPY loopgpt/ loopgpt/
COPY model/ model/
COPY server/ server/
COPY train/ train/
COPY export/ export/
COPY loadtest/ loadtest/
# The project itself, not a registry package: its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[server,gpu]"

# `loopgpt serve` with no --checkpoint serves ./checkpoints/demo, relative to this WORKDIR.
COPY checkpoints/demo/ checkpoints/demo/

# A numeric user, so that runtimes enforcing runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --gid 10001 loopgpt && useradd --create-home --uid 10001 --gid 10001 loopgpt
USER 10001:10001

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LOOPGPT_PORT', '8000') + '/health', timeout=4)"]
CMD ["loopgpt", "serve", "--host", "0.0.0.0"]
