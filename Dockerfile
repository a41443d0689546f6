# The application image: every `chatbot` process (api, relay, worker, projector, bootstrap)
# runs from it, configured by CHATBOT_* variables (docker-compose.yml). Installed in place
# (editable) so the API finds the web page next to the code.
#
# Build arguments:
#   BASE_IMAGE       any Debian bookworm image: the public Python one by default; one without
#                    Python gets Debian's Python 3.11 (the CI builds from a local debootstrap
#                    image, since no image registry is reachable there: tests/compose/run.py)
#   TORCH_INDEX_URL  where the CPU build of torch comes from (PyPI's torch pulls CUDA
#                    packages); empty to take it from deploy/build-extra/ or PyPI only
# deploy/build-extra/ (empty in git) holds extra CA certificates (*.crt, for a proxy that
# re-signs TLS) and wheels (*.whl, found before the index) for the build; it is mounted for
# the steps that install, never copied into a layer.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=bind,source=deploy,target=/tmp/deploy sh /tmp/deploy/image-python.sh /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /app
# torch first and pinned, as the Makefile does
RUN --mount=type=bind,source=deploy/build-extra,target=/tmp/build-extra \
    pip install --find-links /tmp/build-extra ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} torch==2.13.0
COPY pyproject.toml README.md ./
COPY chatbot chatbot
COPY domain domain
COPY projections projections
COPY workers workers
COPY api api
COPY web web
RUN --mount=type=bind,source=deploy/build-extra,target=/tmp/build-extra \
    pip install --find-links /tmp/build-extra -e .
RUN useradd --uid 10001 --create-home chatbot && mkdir /data && chown chatbot /data
USER chatbot
ENV CHATBOT_DATA_DIR=/data \
    CHATBOT_API_HOST=0.0.0.0 \
    CHATBOT_API_PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["chatbot", "api"]
