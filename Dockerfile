# docker build -t spa-demo . && docker run -p 7860:7860 spa-demo
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    SPA_CACHE_DIR=/opt/spa-cache \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 spa

WORKDIR /opt/spa-demo
# Dependencies first (a layer that survives source edits), with the same steps as `make install`.
COPY pyproject.toml Makefile README.md ./
COPY app/__init__.py app/
COPY device_agent/__init__.py device_agent/
COPY cloud_api/__init__.py cloud_api/
COPY personalization/__init__.py personalization/
COPY protocol/__init__.py protocol/
RUN make install VENV=/opt/venv TORCH_INDEX=$TORCH_INDEX && rm -rf /root/.cache/pip

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
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"
CMD ["spa-demo", "--host", "0.0.0.0"]
