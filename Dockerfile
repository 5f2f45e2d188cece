# coupon-stream worker image.
#
#   make image                     # podman; offline it builds its base images first
#   docker build -t coupon-stream .
#   docker run --rm -e COUPON_BROKER=kafka://kafka:9092 -e COUPON_DB_URL=... coupon-stream
#
# The entrypoint is the `coupon-stream` CLI, so the other subcommands work too:
#   docker run --rm coupon-stream generate --orders 1000 --out /tmp/demo
#
# HTTPS behind a proxy that re-signs TLS: give its CA certificates (one PEM bundle) as the
# build secret `extra_ca`; only the pip steps read it, no layer keeps it:
#   docker build --secret id=extra_ca,src=proxy-ca.pem -t coupon-stream .
# (scripts/image.sh does this from COUPON_EXTRA_CA_DIR.) Without the secret nothing changes.

# --- build: install the package and its wheels into a virtualenv ---------------------------
FROM docker.io/library/python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# pip into the venv, trusting the extra CA certificates of the build secret if one is given.
RUN python -m venv /opt/venv \
    && printf '%s\n' '#!/bin/sh' \
       'if [ -s /run/secrets/extra_ca ]; then' \
       '  cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra_ca >/tmp/pip-ca.pem' \
       '  export PIP_CERT=/tmp/pip-ca.pem' \
       'fi' \
       '/opt/venv/bin/pip "$@"; rc=$?; rm -f /tmp/pip-ca.pem; exit $rc' \
       >/usr/local/bin/venv-pip \
    && chmod 0755 /usr/local/bin/venv-pip

WORKDIR /src
# The dependencies and the build backend first, from pyproject.toml alone: a change of the
# code or the README keeps this layer, and the step after it needs no network.
COPY pyproject.toml ./
RUN --mount=type=secret,id=extra_ca \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" \
       >/tmp/requirements.txt \
    && venv-pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# pyproject.toml references README.md (project.readme), so the build needs it.
COPY README.md ./
COPY coupon_stream/ ./coupon_stream/
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation --no-index . \
    && /opt/venv/bin/pip check

# --- runtime: the virtualenv only, no sources, no build leftovers --------------------------
FROM docker.io/library/python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    COUPON_DATA_DIR=/var/lib/coupon-stream \
    COUPON_WEB_HOST=0.0.0.0 \
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

# Web port on all interfaces (COUPON_WEB_HOST above), for the HEALTHCHECK and Prometheus:
# /health/live, /health/ready, /metrics, and nothing else.
EXPOSE 6066

# Ready = tables recovered, not rebalancing, database answers (503 otherwise).
# slim has no curl: urllib raises on connection errors and on non-2xx answers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('COUPON_WEB_PORT', '6066'), timeout=3)"]

# SIGTERM (docker stop, podman stop, Kubernetes) stops the worker cleanly: it leaves the
# group, and the partitions' next owner resumes from the committed offsets.
STOPSIGNAL SIGTERM
ENTRYPOINT ["coupon-stream"]
CMD ["worker"]
