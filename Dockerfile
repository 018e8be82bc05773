# syntax=docker/dockerfile:1
# The operator image: slim, non-root, only the `operator` extra (kopf + kubernetes; no torch).
# Build from the repository root:   docker build -t finetune-operator:0.1.0 .
# Every Python package is pinned (trainer-image/requirements-operator.txt, the whole closure);
# the build stops at the first missing or conflicting package (pip check, import smoke test).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first: this layer is reused until the lock changes.
COPY trainer-image/requirements-operator.txt /tmp/requirements-operator.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --requirement /tmp/requirements-operator.txt
# The project itself, without re-resolving anything (--no-deps: the lock above is the truth).
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer-image/finetune_trainer/ trainer-image/finetune_trainer/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -c "import kopf, kubernetes, finetune_operator.crd, finetune_trainer.cli" \
 && /opt/venv/bin/finetune --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="kopf operator reconciling FineTuneJobs into PyTorchJobs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/finetune-operator/finetune-operator"
RUN useradd --uid 65532 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin finetune
COPY --from=build /opt/venv /opt/venv
# The chart runs it with a read-only root filesystem: no .pyc writes, /tmp is an emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
# kopf's liveness endpoint (--liveness http://0.0.0.0:8080/healthz).
EXPOSE 8080
ENTRYPOINT ["finetune"]
CMD ["operator", "--all-namespaces", "--standalone", "--liveness=http://0.0.0.0:8080/healthz"]
