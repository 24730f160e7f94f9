# The NoProp trainer and exporter: torch with CUDA, onnx and onnxruntime.
#
#   docker build -f docker/train.Dockerfile -t noprop-train .
#
# The torch wheels carry their own CUDA libraries, so any Debian or Ubuntu base
# with Python 3.11 or newer works, and the GPU needs only the host's driver.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# PIP_CERT: a CA bundle for pip, for builds behind a TLS-intercepting proxy.
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS: local wheel mirrors, so that a build
# need not download torch's 3 GB of CUDA wheels. Mount any such path into the
# build (podman build -v).
ARG PIP_CERT
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/requirements/train.txt /tmp/requirements.txt
# torch and its CUDA wheels fill 5.6 GB. Committing a layer briefly needs about
# four times its size in free disk, so they go in three layers of at most
# 2.4 GB: a build then needs about 9 GB free rather than 22 GB.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install -c /tmp/requirements.txt nvidia-cudnn-cu13 nvidia-cublas triton
RUN grep '^nvidia-' /tmp/requirements.txt > /tmp/nvidia.txt \
    && pip install -r /tmp/nvidia.txt \
    && rm /tmp/nvidia.txt
RUN pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin noprop \
    && mkdir /data /models /runs \
    && chown noprop /models /runs

COPY pyproject.toml README.md /tmp/src/
COPY training /tmp/src/training
COPY export /tmp/src/export
RUN pip install --no-deps /tmp/src \
    && rm -rf /tmp/src
COPY docker/train-and-export.sh /usr/local/bin/train-and-export

ENV NOPROP_DATA_ROOT=/data PYTHONUNBUFFERED=1
USER noprop
WORKDIR /runs
CMD ["train-and-export"]
