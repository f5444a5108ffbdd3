"""Base vs tuned generation from a run folder.

``load_run(run_dir)`` loads what the run trained, the way it trained it: LoRA/QLoRA runs load the
base once (4-bit for qlora) with the adapter on top, and the base side runs with the adapter
disabled; full runs load the tuned weights beside the base. Prompts are rendered exactly as in
training (``template.prompt_ids`` with the run's chat template and system prompt).
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import models, template
from .config import RunSpec
from .runs import RunFolder


class RunError(ValueError):
    """The run folder cannot be used for this (not finished, missing result...)."""


@dataclass
class LoadedRun:
    spec: RunSpec
    tokenizer: object
    base: object          # the base model (a PeftModel for adapter runs)
    tuned: object | None  # the full fine-tuned model; None for adapter runs
    lock: threading.Lock

    def model_for(self, side: str):
        """(model, context) that generates as ``side``: 'base' or 'tuned'."""
        if side == "tuned":
            return (self.tuned, nullcontext()) if self.tuned is not None else (self.base, nullcontext())
        if self.tuned is None and hasattr(self.base, "disable_adapter"):
            return self.base, self.base.disable_adapter()
        return self.base, nullcontext()


def load_run(run_dir, checkpoint: str | None = None) -> LoadedRun:
    run = RunFolder(run_dir)
    if not run.exists():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)")
    spec = run.spec()
    result = run.path / "checkpoints" / checkpoint if checkpoint else run.result_dir()
    if result is None or not result.exists():
        raise RunError(f"{run_dir} has no trained result yet (state: {run.status().get('state')})")
    model_path = models.resolve_model(spec.model.model)
    tokenizer = template.setup_chat_template(
        models.load_tokenizer(model_path, spec.model.trust_remote_code), spec.model.chat_template
    )
    base, _ = models.load_base(model_path, spec.model.method, spec.model.trust_remote_code)
    tuned = None
    if spec.model.method == "full":
        tuned, _ = models.load_base(str(result), "full")
        tuned.eval()
    else:
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, str(result))
    base.eval()
    return LoadedRun(spec, tokenizer, base, tuned, threading.Lock())


def generate(loaded: LoadedRun, messages: list[dict], side: str = "tuned", system_prompt: str | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 50,
             repetition_penalty: float = 1.0, seed: int = 0) -> str:
    """One answer from ``side`` for the conversation ``messages`` (last turn: the user's)."""
    tok = loaded.tokenizer
    system = loaded.spec.data.system_prompt if system_prompt is None else system_prompt
    ids = torch.tensor([template.prompt_ids(tok, messages, system)])
    model, context = loaded.model_for(side)
    ids = ids.to(model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with loaded.lock, context, torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty, eos_token_id=sorted(template.end_of_turn_ids(tok)),
            pad_token_id=tok.pad_token_id, **sampling,
        )
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def compare(loaded: LoadedRun, prompt: str, sides=("base", "tuned"), **kwargs) -> dict:
    """The same prompt, settings and seed on each side."""
    messages = [{"role": "user", "content": prompt}]
    return {side: generate(loaded, messages, side, **kwargs) for side in sides}
