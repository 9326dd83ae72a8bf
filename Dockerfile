# agentwatch worker image: `docker build -t agentwatch .`
# CPU torch first (from PyTorch's CPU index: a plain `torch` pulls GBs of CUDA), then the project
# in one resolver run, as the Makefile does.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AGENTWATCH_DATA_DIR=/var/lib/agentwatch \
    AGENTWATCH_METRICS_ADDR=0.0.0.0 \
    AGENTWATCH_METRICS_PORT=9108

RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

WORKDIR /src
COPY . /src
RUN pip install /src \
    && useradd --system --uid 10001 --home-dir /var/lib/agentwatch --create-home agentwatch

USER agentwatch
WORKDIR /var/lib/agentwatch
VOLUME ["/var/lib/agentwatch"]
EXPOSE 9108

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=4 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('AGENTWATCH_METRICS_PORT', '9108'), timeout=4)"

ENTRYPOINT ["agentwatch"]
CMD ["worker", "--bootstrap-servers", "kafka:9092", "--metrics-port", "9108"]
