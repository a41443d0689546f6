#!/bin/sh
# Run by deploy/triton.Dockerfile at build time, with deploy/ mounted at /tmp/deploy. NVIDIA's
# Triton image has tritonserver and a system Python: the model's packages go there. Any other
# base gets a virtualenv with the nvidia-pytriton wheel, which ships tritonserver and the
# python backend, and a /usr/local/bin/tritonserver that runs it as NVIDIA's image would (same
# name, same flags).
set -eu
packages="torch==2.13.0 numpy==1.26.4 tokenizers==0.23.3 safetensors==0.8.0"
extra=""
if [ -n "${TORCH_INDEX_URL:-}" ]; then extra="--extra-index-url $TORCH_INDEX_URL"; fi
export PIP_FIND_LINKS=/tmp/deploy/build-extra PIP_CERT=/etc/ssl/certs/ca-certificates.crt
if command -v tritonserver >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    pip install --no-cache-dir $extra $packages
    exit 0
fi
sh /tmp/deploy/image-python.sh /opt/venv
# curl for the compose file's health check, as NVIDIA's image has it
apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
# shellcheck disable=SC2086
/opt/venv/bin/pip install --no-cache-dir $extra $packages nvidia-pytriton==0.7.0
site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
home="$site/pytriton/tritonserver"
version=$(/opt/venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# Triton looks for the python backend stub only next to the backend (chatbot/ops/servers.py)
cp "$home/python_backend_stubs/$version/triton_python_backend_stub" "$home/backends/python/"
cat > /usr/local/bin/tritonserver <<SCRIPT
#!/bin/sh
# tritonserver of the nvidia-pytriton wheel (deploy/triton-install.sh): its libraries, its
# backends, and the virtualenv's packages for the model's Python code
export LD_LIBRARY_PATH="$site/nvidia_pytriton.libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PYTHONPATH="$site\${PYTHONPATH:+:\$PYTHONPATH}"
exec "$home/bin/tritonserver" --backend-directory="$home/backends" --allow-gpu-metrics=false "\$@"
SCRIPT
chmod 755 /usr/local/bin/tritonserver
