"""English and Chinese labels, kept next to each other. Gradio picks the browser's language."""

import gradio as gr

LABELS = {
    "title": ("Fine-tuning studio", "微调工作室"),
    "data": ("Data", "数据"),
    "train": ("Train", "训练"),
    "runs": ("Runs", "任务"),
    "compare": ("Compare", "对比"),
    "dataset": ("Dataset (.json .jsonl .csv .parquet .txt)", "数据集（.json .jsonl .csv .parquet .txt）"),
    "format": ("Format", "格式"),
    "mapping": ("Column mapping (FIELD=COLUMN per line, optional)", "列映射（每行 字段=列名，可选）"),
    "system_prompt": ("System prompt", "系统提示词"),
    "max_length": ("Max length (tokens)", "最大长度（token）"),
    "check": ("Check dataset", "检查数据集"),
    "sample": ("First row as the model sees it (highlighted: what the loss covers)", "模型看到的第一条样本（高亮部分计入损失）"),
    "lengths": ("Token lengths", "Token 长度分布"),
    "model": ("Base model (empty: embedded SmolLM2-135M-Instruct; or a local folder / hub id)",
              "基座模型（留空：内置 SmolLM2-135M-Instruct；或本地目录 / Hub ID）"),
    "method": ("Method", "方法"),
    "preset": ("Preset", "预设"),
    "epochs": ("Epochs", "训练轮数"),
    "lr": ("Learning rate", "学习率"),
    "batch": ("Batch size (per device)", "批大小（每设备）"),
    "advanced": ("Advanced", "高级选项"),
    "estimate": ("Memory and disk estimate", "显存与磁盘估算"),
    "config": ("Resolved config", "最终配置"),
    "command": ("Equivalent command", "等价命令"),
    "queue": ("Queue run", "加入队列"),
    "refresh": ("Refresh", "刷新"),
    "cancel": ("Cancel", "取消"),
    "resume": ("Resume", "继续"),
    "delete": ("Delete", "删除"),
    "download": ("Download result", "下载结果"),
    "run": ("Run", "任务"),
    "loss": ("Loss", "损失"),
    "log": ("Last log lines", "最新日志"),
    "prompt": ("Prompt", "提示"),
    "run_folder": ("Run folder", "任务目录"),
    "generate": ("Generate both", "同时生成"),
    "base": ("Base", "基座模型"),
    "tuned": ("Tuned", "微调后"),
    "max_new": ("Max new tokens", "最大生成长度"),
    "temperature": ("Temperature (0 = greedy)", "温度（0 = 贪心）"),
    "seed": ("Seed", "随机种子"),
    "mix_data": ("General data to mix in against forgetting (path, optional)", "混入通用数据以防遗忘（路径，可选）"),
}

i18n = gr.I18n(en={k: v[0] for k, v in LABELS.items()}, zh={k: v[1] for k, v in LABELS.items()})


def t(key: str):
    """A label that follows the browser's language."""
    return i18n(key)
