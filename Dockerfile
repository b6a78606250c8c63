# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t ssad-tune-api .     # FastAPI, no torch (small, fast start)
#   docker build --target worker -t ssad-tune-worker .  # the engine with the CUDA build of torch
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN useradd --create-home --uid 10001 ssad
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY ssad_common ./ssad_common
COPY ssad_tune ./ssad_tune
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations

FROM base AS api
# The API and migrations only: ssad_common.search_space and ssad_common.images are torch-free.
RUN pip install -c constraints.txt ".[server]"
# Numeric: Kubernetes' runAsNonRoot refuses a named user it cannot check (deploy/k8s).
USER 10001
EXPOSE 8000
# --http: TCP_NODELAY on every connection (service/serving.py)
CMD ["uvicorn", "service.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", \
     "--http", "service.serving:NoDelayH11Protocol"]

FROM base AS worker
# PyPI's torch for linux/x86_64 is the CUDA build (it brings its CUDA libraries); the same
# version the tests run on the CPU wheel.
RUN pip install "torch==2.13.0" && pip install -c constraints.txt ".[worker]"
# The cache folder exists and is the user's: a named volume mounted on a path the image
# lacks is created root-owned, and the worker could not write its cache there.
RUN mkdir -p /home/ssad/cache && chown 10001:10001 /home/ssad/cache
USER 10001
ENV SSAD_CACHE_DIR=/home/ssad/cache
CMD ["python", "-m", "worker", "--device", "auto"]
