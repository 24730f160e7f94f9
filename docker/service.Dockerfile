# The NoProp classifier service: onnxruntime-gpu with the CUDA execution
# provider, falling back to the CPU when no GPU is visible.
#
#   docker build -f docker/service.Dockerfile -t noprop-service .
#
# BASE_IMAGE must be Debian or Ubuntu based. The default carries CUDA 13 and
# cuDNN 9, which onnxruntime-gpu 1.31 needs for the CUDA execution provider.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# PIP_CERT: a CA bundle for pip, for builds behind a TLS-intercepting proxy.
# When it is set, the file must be mounted into the build (podman build -v).
ARG PIP_CERT
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, so that a change to the code rebuilds only the last layers.
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY docker/requirements/serve.txt /tmp/requirements.txt
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin noprop

# The default model. Other models come from the /models volume, selected with
# NOPROP_MODEL_PATH.
COPY models/mnist-dt-onehot/model.onnx /opt/noprop/models/mnist-dt-onehot/model.onnx
RUN mkdir /models && chown noprop /models

COPY pyproject.toml README.md /tmp/src/
COPY service /tmp/src/service
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps /tmp/src \
    && rm -rf /tmp/src
COPY docker/healthcheck.py /opt/noprop/healthcheck.py

ENV NOPROP_HOST=0.0.0.0 \
    NOPROP_PORT=8000 \
    NOPROP_MODEL_PATH=/opt/noprop/models/mnist-dt-onehot/model.onnx \
    PYTHONUNBUFFERED=1
USER noprop
WORKDIR /opt/noprop
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/noprop/healthcheck.py"]

# The exec form makes python PID 1, so SIGTERM from `docker stop` reaches the
# service, which stops readiness, finishes the requests in flight and exits.
CMD ["python3", "-m", "service"]
