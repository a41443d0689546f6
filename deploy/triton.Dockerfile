# Triton with what the python-backend model in triton_models/chat imports: torch and the
# model code (chatbot/llm, mounted by docker-compose.yml at /opt/chatbot).
FROM nvcr.io/nvidia/tritonserver:25.10-py3
RUN pip install --no-cache-dir torch==2.13.0 numpy==1.26.4 tokenizers==0.23.3 safetensors==0.8.0
ENV PYTHONPATH=/opt/chatbot
EXPOSE 8000 8001 8002
