# coupon-stream worker image.
#
#   docker build -t coupon-stream .
#   docker run --rm -e COUPON_BROKER=kafka://kafka:9092 -e COUPON_DB_URL=... coupon-stream
#
# The entrypoint is the `coupon-stream` CLI, so the other subcommands work too:
#   docker run --rm coupon-stream generate --orders 1000 --out /tmp/demo

# --- build: install the package and its wheels into a virtualenv ---------------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# pyproject.toml references README.md (project.readme), so the build needs it.
COPY pyproject.toml README.md ./
COPY coupon_stream/ ./coupon_stream/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir .

# --- runtime: the virtualenv only, no sources, no build leftovers --------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    COUPON_DATA_DIR=/var/lib/coupon-stream \
    COUPON_WEB_PORT=6066

RUN groupadd --system --gid 10001 coupon \
    && useradd --system --uid 10001 --gid coupon --create-home --home-dir /home/coupon \
       --shell /usr/sbin/nologin coupon \
    && install -d -o coupon -g coupon -m 0750 /var/lib/coupon-stream

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/coupon

# RocksDB table state; recoverable from the changelog topics, but keeping it saves recovery time.
VOLUME ["/var/lib/coupon-stream"]

# Faust web server: /health/live, /health/ready, /metrics.
EXPOSE 6066

# Ready = tables recovered, not rebalancing, database answers (503 otherwise).
# slim has no curl: urllib raises on connection errors and on non-2xx answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('COUPON_WEB_PORT', '6066'), timeout=3)"]

ENTRYPOINT ["coupon-stream"]
CMD ["worker"]
