# rfclip ML backend for Label Studio.
#   CPU (default):  docker build -t rfclip .
#   CUDA:           docker build -t rfclip-cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#                   (PyPI's torch wheel carries its CUDA libraries; run with --gpus all and
#                   RFCLIP_DEVICE=cuda). BASE_IMAGE may point at any Debian-based Python 3.11 image.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# glibc's malloc gives big freed buffers back to the kernel (munmap, or trimming the heap's top),
# so each forward page-faults its attention and MLP buffers in anew. These keep buffers of up to
# 32 MB, and the heap's free top, for reuse (a worker keeps the memory of its peak): on the CPU
# rfclip ran about 5 % faster, plain CLIP 2-3 %, and times stopped depending on the heap's
# history (benchmarks/RESULTS.md, run I). Triton's compiled kernels (the CUDA image) go to the
# volume the weights go to, so a new container or worker does not compile them again.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/hf \
    TRITON_CACHE_DIR=/hf/triton \
    RFCLIP_CACHE_DIR=/cache \
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=1073741824

# The CUDA image also gets a C compiler: Triton builds its CUDA launcher with one the first time a
# kernel runs (triton/runtime/build.py), and without it every RF-CLIP kernel fails its check and the
# eager steps run instead. The CPU image runs no Triton kernel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && case "${TORCH_INDEX_URL}" in */whl/cpu*) ;; *) apt-get install -y --no-install-recommends gcc libc6-dev ;; esac \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1 \
    && pip install -r requirements.txt

COPY pyproject.toml README.md ./
COPY rfclip_engine rfclip_engine
COPY backend backend
RUN pip install --no-deps . \
    && useradd --create-home rfclip \
    && mkdir -p /models /cache /hf && chown rfclip /models /cache /hf

USER rfclip
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2)"
CMD ["rfclip-backend", "serve", "--host", "0.0.0.0", "--port", "9090"]
