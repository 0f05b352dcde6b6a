# The one image behind the web, worker and flower services of docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY workers ./workers
RUN pip install ".[flower]"
COPY config ./config

# Celery refuses to run as root with pickle, and nothing here needs root.
RUN useradd --system --uid 10001 --home-dir /app relay
USER relay

EXPOSE 8000
CMD ["relay", "web", "--host", "0.0.0.0", "--port", "8000"]
