# Triton with what the python-backend model in triton_models/chat imports: torch and the
# model code (chatbot/inference, mounted by docker-compose.yml at /opt/chatbot).
#
# Build arguments:
#   BASE_IMAGE       NVIDIA's Triton image by default (CUDA; torch from PyPI is a CUDA build).
#                    Any Debian bookworm image works too: it gets Python and the tritonserver
#                    of the nvidia-pytriton wheel, and serves on the CPU (the CI builds it from
#                    a local debootstrap image: tests/compose/run.py)
#   TORCH_INDEX_URL  an extra index for torch, such as https://download.pytorch.org/whl/cpu
#                    for a CPU-only image; empty by default
# deploy/build-extra/: as in ../Dockerfile
ARG BASE_IMAGE=nvcr.io/nvidia/tritonserver:25.10-py3
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=
RUN --mount=type=bind,source=deploy,target=/tmp/deploy sh /tmp/deploy/triton-install.sh
ENV PYTHONPATH=/opt/chatbot
EXPOSE 8000 8001 8002
