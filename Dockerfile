# The application image: every `chatbot` process (api, relay, worker, projector, bootstrap)
# runs from it, configured by CHATBOT_* variables (docker-compose.yml). Installed in place
# (editable) so the API finds the web page next to the code.
FROM python:3.11-slim
WORKDIR /app
# torch first and pinned, as the Makefile does
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md ./
COPY chatbot chatbot
COPY domain domain
COPY projections projections
COPY workers workers
COPY api api
COPY web web
RUN pip install --no-cache-dir -e .
RUN useradd --uid 10001 --create-home chatbot && mkdir /data && chown chatbot /data
USER chatbot
ENV CHATBOT_DATA_DIR=/data \
    CHATBOT_API_HOST=0.0.0.0 \
    CHATBOT_API_PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["chatbot", "api"]
