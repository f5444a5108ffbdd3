"""Fine-tuning studio backend: data, models, training, queue. Never imports gradio."""
