# docker build -t spa-demo . && docker run -p 7860:7860 spa-demo     (make docker-test: the check)
# Build arguments: BASE_IMAGE (any image with Python 3.11, python3 -m venv and pip; default
# python:3.11-slim), TORCH_INDEX (a CPU wheel index for torch), PIP_INDEX_URL / PIP_FIND_LINKS
# (package sources). A private CA for pip comes in as the BuildKit secret `pip-cert`, never baked
# into a layer: DOCKER_BUILDKIT=1 docker build --secret id=pip-cert,src=/path/ca.crt ...
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=
ARG PIP_FIND_LINKS=
ENV PYTHONUNBUFFERED=1 \
    SPA_CACHE_DIR=/opt/spa-cache \
    SPA_DEMO_PORT=7860 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

RUN (command -v make >/dev/null || (apt-get update && apt-get install -y --no-install-recommends \
    make && rm -rf /var/lib/apt/lists/*)) \
    && useradd --create-home --uid 1000 spa

WORKDIR /opt/spa-demo
# Dependencies first (a layer that survives source edits), with the same steps as `make install`.
COPY pyproject.toml Makefile README.md ./
COPY app/__init__.py app/
COPY device_agent/__init__.py device_agent/
COPY cloud_api/__init__.py cloud_api/
COPY personalization/__init__.py personalization/
COPY protocol/__init__.py protocol/
RUN --mount=type=secret,id=pip-cert \
    if [ -f /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && if [ -z "$PIP_INDEX_URL" ]; then unset PIP_INDEX_URL; fi \
    && if [ -z "$PIP_FIND_LINKS" ]; then unset PIP_FIND_LINKS; fi \
    && make install VENV=/opt/venv TORCH_INDEX=$TORCH_INDEX && rm -rf /root/.cache/pip

COPY app app
COPY device_agent device_agent
COPY cloud_api cloud_api
COPY personalization personalization
COPY protocol protocol
# Build time: convert the embedded backbone and train the demo users' side networks, so a
# container serves device-coloured tokens seconds after it starts.
RUN spa prepare && spa demo --prepare-only && chown -R spa:spa $SPA_CACHE_DIR

USER spa
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['SPA_DEMO_PORT'] + '/', timeout=4)"
CMD ["spa-demo", "--host", "0.0.0.0"]
