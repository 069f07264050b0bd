# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t distillery-api .     # REST API, scheduler, migrations: no torch
#   docker build --target worker -t distillery-worker .  # Celery GPU worker: torch (CUDA build) + transformers
# Both run as the unprivileged user `distillery` and keep their state in DATA_DIR=/data (a shared volume).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 distillery \
 && useradd --system --uid 10001 --gid distillery --home-dir /app --shell /usr/sbin/nologin distillery
WORKDIR /app

# ---- build stages: a virtual environment each, copied into slim runtime stages -------------------------
FROM base AS api-build
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY distillery ./distillery
COPY distillery_cli ./distillery_cli
RUN /opt/venv/bin/pip install ".[api]"

FROM base AS worker-build
RUN python -m venv /opt/venv
# torch first, pinned: PyPI's Linux x86_64 wheel of 2.13.0 is the CUDA build GPU workers need.
ARG TORCH_SPEC="torch==2.13.0"
RUN /opt/venv/bin/pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY distillery ./distillery
COPY distillery_cli ./distillery_cli
RUN /opt/venv/bin/pip install ".[worker]"

# ---- runtime: api ---------------------------------------------------------------------------------------
FROM base AS api
COPY --from=api-build /opt/venv /opt/venv
COPY alembic.ini ./
COPY migrations ./migrations
ENV PATH=/opt/venv/bin:$PATH \
    DATA_DIR=/data \
    HOST=0.0.0.0 \
    PORT=8000
RUN mkdir -p /data && chown distillery:distillery /data
USER distillery
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

# ---- runtime: worker ------------------------------------------------------------------------------------
FROM base AS worker
COPY --from=worker-build /opt/venv /opt/venv
COPY alembic.ini ./
COPY migrations ./migrations
ENV PATH=/opt/venv/bin:$PATH \
    DATA_DIR=/data \
    WORKER_CONCURRENCY=1
RUN mkdir -p /data && chown distillery:distillery /data
USER distillery
# One worker process per GPU: the container sees one device (compose reserves it by id).
CMD ["sh", "-c", "exec celery -A workers.celery_app worker -Q training --concurrency \"${WORKER_CONCURRENCY}\" --hostname worker@%h --loglevel INFO"]
