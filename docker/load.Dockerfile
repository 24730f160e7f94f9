# Locust load generator for a deployed NoProp service.
#
#   docker build -f docker/load.Dockerfile -t noprop-load .
#
# It posts the real MNIST digits in examples/digits/ unless the command names
# another image folder.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# PIP_CERT: a CA bundle for pip, for builds behind a TLS-intercepting proxy.
# When it is set, the file must be mounted into the build (podman build -v).
ARG PIP_CERT
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY docker/requirements/load.txt /tmp/requirements.txt
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin noprop \
    && mkdir /reports && chown noprop /reports

COPY pyproject.toml README.md /tmp/src/
COPY loadtest /tmp/src/loadtest
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps /tmp/src \
    && rm -rf /tmp/src
COPY examples/digits /opt/noprop/examples/digits

ENV PYTHONUNBUFFERED=1
USER noprop
WORKDIR /reports
CMD ["python", "-m", "loadtest", "run", "--help"]
