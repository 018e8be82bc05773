# The operator image: slim, non-root, only the operator extra (no torch).
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer-image/finetune_trainer/ trainer-image/finetune_trainer/
RUN python -m pip install --no-cache-dir --upgrade pip==25.3 \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

FROM python:3.11.7-slim-bookworm
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin finetune
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels "finetune-operator[operator]" \
 && rm -rf /wheels
USER 65532:65532
ENTRYPOINT ["finetune", "operator"]
