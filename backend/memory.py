"""Pre-flight estimate of peak training memory and checkpoint disk use, from a model config alone.

    from transformers import AutoConfig
    est = estimate(AutoConfig.from_pretrained(path), "qlora", seq_tokens=8 * 1024, device="cuda")
    est.total, est.breakdown(), est.fits(device_free_memory("cuda")[0])

or for a run: ``estimate_for_spec(spec, config, device)``. Nothing is loaded: the model is built
on the meta device (``torch.device("meta")``) to count parameters and find its Linear
layers, and the rest is arithmetic. All sizes are bytes.

What a training step holds at its peak (the start of backward, when every activation is still
saved and the loss gradient has just been made):

    total = weights + lora_params + gradients + optimizer + overhead
            + max(weight_copies + activations + logits, step_scratch)

* **weights**: the base at the method's precision (``models.precision_for``). full: fp32 master
  weights, 4 B/param. lora: the frozen base in bf16/fp16 (2 B) on CUDA, fp32 (4 B) on CPU. qlora:
  every Linear inside the decoder in NF4 with double quantisation, 4 bits + an 8-bit absmax per
  64 weights + an fp32 absmax per 256 of those = 4.127 bits ~ 0.516 B/param; everything else
  (embeddings, lm_head, norms) at 4 B, because peft's ``prepare_model_for_kbit_training`` (which
  ``train._setup_model`` calls) casts every non-quantised 16-bit parameter to fp32.
* **lora_params**: the adapters, r * (in + out) per targeted Linear, kept in fp32 (4 B) by peft.
* **gradients**: 4 B per trainable parameter (fp32 master weights or fp32 adapters).
* **optimizer**: AdamW keeps two fp32 moments, 8 B per trainable parameter; 8-bit optimizers
  (``adamw_bnb_8bit``, ``paged_adamw_8bit``...) 2 B. So full fine-tuning with mixed-precision
  Adam costs 4 + 4 + 8 = 16 B/param before activations, the usual "~16 bytes per parameter"
  (ZeRO, Rajbhandari et al. 2020, count it as 2 + 2 + 12 with fp16 weights and grads beside the
  fp32 master copy; the Trainer instead keeps fp32 weights and autocasts, so the 16-bit copies
  are transient, see the next line).
* **weight_copies**: full on CUDA only: autocast casts each fp32 Linear weight to 16 bits once per
  forward and the copy is saved for backward, 2 B per Linear parameter.
* **activations**: what autograd saves, per decoder layer and token, counted op by op for a
  Llama-style layer (RMSNorm, attention, SwiGLU MLP) in the way transformers 5 runs it and
  checked against ``torch.autograd.graph.saved_tensors_hooks`` on CPU (tests/test_memory.py).
  ``_layer_activation_bytes`` lists the terms. Packing matters: under transformers' plain SDPA a
  packed row of ``s`` tokens gets a block-diagonal mask, which SDPA turns into an s x s float
  tensor in every layer and keeps for backward (quadratic in the packed length), and with a mask
  k and v are repeated to every head. Training runs ``packed_sdpa`` (``backend.attention``),
  causal SDPA per example, which keeps neither. No s x s score matrix is stored (flash /
  memory-efficient kernels). This replaces
  Korthikanti et al. 2022's sbh(34 + 5as/h) (GPT with GeLU MLP, dropout, stored scores).
  With gradient checkpointing: each layer's input (s*h) plus one layer recomputed in backward.
* **logits**: the loss projects onto the vocabulary only where a token is learned
  (``train.StudioTrainer``); at the start of backward the fp32 log-softmax output, its incoming
  gradient and the gradient it returns are alive together: 3 * 4 B * tokens_with_loss * vocab.
* **step_scratch**: ``adamw_torch`` on CUDA is the foreach implementation, which makes one fp32
  temporary the size of all trainable parameters (sqrt of the second moment) during the step,
  after activations are freed.
* **heap**: CPU, LoRA/QLoRA only: freed memory that glibc's heap still holds at the peak,
  ``CPU_HEAP_PER_LORA_OUTPUT`` x the LoRA layers' outputs (a measured factor, see the constant).
* **overhead**: the CUDA context, or on CPU the process itself (constants below).

Checked on CPU by ``python -m backend bench`` (SmolLM2-135M, all-linear r=16, 8 identity rows a
step; the estimate for the largest step, 1,091 tokens; 2026-11-29): qlora 3,804 MiB peak RSS,
lora 3,948, full 4,355 (see README, Benchmarks, for the estimate's error). Against the live peak
alone (``MALLOC_MMAP_THRESHOLD_=131072`` returns every freed tensor to the system at once):
qlora 2,571 and lora 2,915 MiB, estimated without the heap term at 2,521 and 2,874; full 4,012,
estimated at 4,473 (its weight gradients are counted whole, though the first ones are made while
the last activations are freed). The CUDA-only terms (bool dropout masks, autocast copies, the
memory-efficient kernel keeping its mask, foreach Adam) come from reading the torch and peft code
paths and have not yet been measured on a GPU.

Not counted: allocator fragmentation on CUDA (the caching allocator typically adds 5-15 %), the
qlora weight dequantised one layer at a time, RoPE tables, the dataset, DoRA's magnitude vectors,
``modules_to_save``.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .models import precision_for

ATTN_IMPLEMENTATIONS = ("packed_sdpa", "sdpa", "flash_attention_2")
GiB = 2**30
MiB = 2**20

# The CUDA context (driver, cuBLAS/cuDNN handles, kernels) lives outside torch's allocator:
# ~300-600 MB on recent GPUs and drivers; nvidia-smi shows it, torch.cuda.max_memory_allocated not.
CUDA_CONTEXT_BYTES = 500 * MiB
# Resident memory of a CPU training process before the model loads: python + torch + transformers
# + peft + datasets + the Trainer imported (measured 504 MiB RSS, torch 2.13 CPU, transformers 5.24).
CPU_PROCESS_BYTES = 500 * MiB
# CPU, LoRA/QLoRA: freed memory glibc's heap holds at the peak beyond the live tensors, per byte of
# LoRA layer output (out_features x 4 B per token, summed over the targeted Linears): peft's forward
# makes and frees output-sized temporaries in every adapted layer (lora_B's output, its scaled copy,
# the replaced sum), and the heap does not hand those holes back. Measured by the benchmark
# (SmolLM2-135M, all-linear r=16, 8 identity rows a step; live peak from a run with
# MALLOC_MMAP_THRESHOLD_=131072, which returns every freed tensor at once but halves the speed):
# lora 1.6x, qlora 1.9x. Full fine-tuning makes no such temporaries: peak RSS within 9 % of live.
CPU_HEAP_PER_LORA_OUTPUT = 1.75
# Per checkpoint and per result folder besides weights and optimizer: tokenizer files (tokenizer.json
# is 2-17 MB for common models), trainer/scheduler/RNG state (a few KB).
CHECKPOINT_EXTRA_BYTES = 16 * MiB
# NF4 with double quantisation (bitsandbytes, blocksize 64): 4 bits per weight, an 8-bit absmax per
# 64 weights and an fp32 absmax per 256 absmax blocks.
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
ADAPTER_BYTES = 4  # peft keeps LoRA weights in fp32 even on a 16-bit base (autocast_adapter_dtype)

# Llama-style layer roles by Linear name: which layers read the same input tensor.
_ATTN_IN = {"q_proj", "k_proj", "v_proj", "qkv_proj"}
_ATTN_OUT = {"o_proj"}
_MLP_IN = {"gate_proj", "up_proj", "gate_up_proj"}
_MLP_OUT = {"down_proj"}


@dataclass
class Estimate:
    """Peak training memory and disk use for one run, in bytes (see the module docstring)."""

    method: str
    device: str
    seq_tokens: int
    params: int                 # parameters in the model (tied embeddings once)
    trainable: int              # parameters the optimizer updates
    weights: int
    lora_params: int
    gradients: int
    optimizer: int
    weight_copies: int
    activations: int
    logits: int
    heap: int                   # CPU LoRA/QLoRA: freed memory glibc keeps (CPU_HEAP_PER_LORA_OUTPUT)
    step_scratch: int
    overhead: int
    total: int
    disk_per_checkpoint: int
    disk_result: int
    disk_total: int             # result + save_total_limit + 1 checkpoints (see disk())
    reference: int = 0          # DPO's frozen reference: a copy of the weights (full) or of the adapter (LoRA)
    ewc: int = 0                # EWC: the base weights and the Fisher diagonal (fp32), and the penalty's difference
    notes: list[str] = field(default_factory=list)

    def breakdown(self) -> dict[str, int]:
        """Memory terms for display, largest meaning first; they add up to ``total``."""
        backward = self.weight_copies + self.activations + self.logits + self.heap
        rows = {
            "weights": self.weights,
            "lora_params": self.lora_params,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "reference": self.reference,
            "ewc": self.ewc,
        }
        if backward >= self.step_scratch:
            rows.update(weight_copies=self.weight_copies, activations=self.activations, logits=self.logits,
                        heap=self.heap)
        else:
            rows["step_scratch"] = self.step_scratch
        rows["overhead"] = self.overhead
        return {k: v for k, v in rows.items() if v} | {"total": self.total}

    def fits(self, free_bytes: int) -> bool:
        return self.total <= free_bytes


# -- counting parameters on the meta device ----------------------------------------------------
@dataclass(frozen=True)
class Inventory:
    """What a config builds, counted without memory."""

    params: int                               # every parameter once (tied embeddings once)
    linears: tuple[tuple[str, int, int], ...] # (module name, in_features, out_features), all of them
    head: str | None                          # the output embedding's module name (lm_head)
    layer_linears: tuple[tuple[str, int, int], ...]  # the Linear modules of one decoder layer, relative names


_INVENTORIES: dict[str, Inventory] = {}


def inventory(config, trust_remote_code: bool = False) -> Inventory:
    """Build the model on the meta device and list its parameters and Linear layers (cached)."""
    key = config.to_json_string(use_diff=False)
    if key not in _INVENTORIES:
        import torch
        from transformers import AutoModelForCausalLM

        # torch.device("meta"), not accelerate's init_empty_weights: that one patches
        # nn.Module.register_parameter for every thread, so a model loading meanwhile in another
        # thread (the playground, in the web app) got meta weights ("Cannot copy out of meta tensor")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        model.tie_weights()
        head_module = model.get_output_embeddings()
        linears, head = [], None
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                linears.append((name, module.in_features, module.out_features))
                if module is head_module:
                    head = name
        layers = _decoder_layers(model, _text_config(config).num_hidden_layers)
        layer_linears = tuple((n, m.in_features, m.out_features) for n, m in layers[0].named_modules()
                              if isinstance(m, torch.nn.Linear)) if layers is not None else ()
        _INVENTORIES[key] = Inventory(sum(p.numel() for p in model.parameters()), tuple(linears), head,
                                      layer_linears)
    return _INVENTORIES[key]


def _decoder_layers(model, n_layers: int):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    return None


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lora_targets(inv: Inventory, target_modules) -> list[tuple[str, int, int]]:
    """The Linear layers peft adapts: 'all-linear' is every Linear but the output head; a list
    matches a name or a dotted suffix; any other string is a regex over the full name."""
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        return [m for m in inv.linears if m[0] != inv.head]
    if isinstance(target_modules, str):
        return [m for m in inv.linears if re.fullmatch(target_modules, m[0])]
    keys = list(target_modules)
    return [m for m in inv.linears if m[0] in keys or any(m[0].endswith("." + k) for k in keys)]


# -- bytes per parameter -----------------------------------------------------------------------
def optimizer_bytes_per_param(optim: str) -> float:
    """State bytes per trainable parameter for a transformers ``optim`` name."""
    name = optim.lower()
    if name in ("sgd", "adafactor", "lomo", "adalomo", "schedule_free_sgd") or "adafactor" in name:
        states = 0  # sgd without momentum; adafactor's factored moments are ~0 per parameter
    elif "ademamix" in name:
        states = 3
    elif any(k in name for k in ("lion", "rmsprop", "adagrad")):
        states = 1
    else:
        states = 2  # Adam-style: first and second moment
    per_state = 1 if "8bit" in name else 0.5 if "4bit" in name else 4
    return states * per_state


# -- activations -------------------------------------------------------------------------------
def _layer_activation_bytes(config, layer_linears, targets: set[str], *, method: str, device: str,
                            seq_tokens: int, r: int, lora_dropout: float, attn_implementation: str) -> int:
    """Bytes autograd saves for one decoder layer over ``seq_tokens`` packed tokens.

    Per token (h hidden, i MLP width, q = heads*head_dim, e = 4 B on CPU and 2 B on CUDA):
    each RMSNorm saves its input upcast to fp32 (4h) and 1/rms; attention saves the log-sum-exp
    (4*heads) and q, k, v and the output: with ``packed_sdpa`` (what training uses,
    ``backend.attention``) and flash_attention_2 (2q + 2kv)*e, but packed_sdpa's o_proj reads a
    concatenated copy, kept (q*e more) when o_proj trains or has LoRA without dropout; with plain
    SDPA k and v repeated to every head (4q*e) and that layer's float copy of the packed s x s
    mask (s*e per token). The SwiGLU MLP saves gate_proj's output, SiLU's output, up_proj's
    output (3i*e) and, when down_proj trains, its input (i*e). Full fine-tuning adds each norm's normalised input for the norm weight's
    gradient and the norm output that the next Linear keeps (under CUDA autocast, one 16-bit copy
    per Linear that reads it: q/k/v and gate/up). LoRA adds per targeted Linear with n inputs:
    with dropout, the dropout mask (float on CPU, bool on CUDA) and lora_A's input (2n on CPU, 3n
    B on CUDA); without dropout lora_A keeps its input (shared by q/k/v and gate/up on CPU where
    no cast happens, its own 16-bit cast per Linear under CUDA autocast); and r*e for lora_B.
    """
    t = _text_config(config)
    h, i, heads = t.hidden_size, t.intermediate_size, t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or h // heads
    kv_heads = getattr(t, "num_key_value_heads", None) or heads
    q, kv = heads * head_dim, kv_heads * head_dim
    cpu = device == "cpu"
    e = precision_for(method, device).compute_dtype.itemsize
    e_res = 4 if method in ("full", "qlora") or cpu else e  # residual stream dtype (see estimate)

    per_token = 2 * (4 * h + 4)
    attn_out_copy = attn_implementation == "packed_sdpa"  # o_proj reads a copy, not the kernel's output
    if attn_implementation in ("packed_sdpa", "flash_attention_2"):  # k, v unrepeated, no mask
        per_token += (2 * q + 2 * kv) * e
    elif attn_implementation == "sdpa":
        per_token += 4 * q * e + seq_tokens * e
    else:
        raise ValueError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                         f"not {attn_implementation!r}")
    per_token += 4 * heads

    def role(name):
        leaf = name.rsplit(".", 1)[-1]
        return next((k for k, s in (("attn_in", _ATTN_IN), ("attn_out", _ATTN_OUT), ("mlp_in", _MLP_IN),
                                    ("mlp_out", _MLP_OUT)) if leaf in s), name)

    if method == "full":
        readers = {}
        for name, _, _ in layer_linears:
            readers[role(name)] = readers.get(role(name), 0) + 1
        per_token += 2 * e_res * h
        norm_outputs = 2 if cpu else readers.get("attn_in", 1) + readers.get("mlp_in", 1)
        per_token += norm_outputs * e * h + 4 * i * e + (q * e if attn_out_copy else 0)
        return per_token * seq_tokens

    per_token += 3 * i * e
    saved_inputs = set()  # on CPU without dropout, Linear layers reading one tensor share it
    for name, n_in, _ in layer_linears:
        if name not in targets:
            continue
        per_token += r * e
        if lora_dropout > 0:
            per_token += n_in * ((4 if cpu else 1) + e)
        elif not cpu:
            per_token += n_in * e
        elif role(name) == "attn_out":
            per_token += n_in * e if attn_out_copy else 0  # else lora_A reads what SDPA already keeps
        elif role(name) not in saved_inputs:
            saved_inputs.add(role(name))
            per_token += n_in * e
    return per_token * seq_tokens


# -- the estimate ------------------------------------------------------------------------------
def estimate(config, method: str = "lora", *, seq_tokens: int, tokens_with_loss: int | None = None,
             r: int = 16, target_modules="all-linear", lora_dropout: float = 0.1,
             gradient_checkpointing: bool = False, device: str = "cuda", optim: str = "adamw_torch",
             attn_implementation: str = "packed_sdpa", save_total_limit: int = 2,
             trust_remote_code: bool = False, stage: str = "sft", ewc: bool = False) -> Estimate:
    """Peak memory of one training step and the run's disk use.

    Args:
        config: a transformers model config (``AutoConfig.from_pretrained(...)``); no weights needed.
        method: ``qlora``, ``lora`` or ``full``.
        seq_tokens: tokens in one packed training row (a batch is one row, see ``train.py``).
        tokens_with_loss: positions projected onto the vocabulary (default: all ``seq_tokens``).
        r, target_modules, lora_dropout: the LoRA settings (ignored for ``full``).
        gradient_checkpointing: keep only layer inputs and recompute one layer at a time in backward.
        device: ``cuda`` or ``cpu``; dtypes come from ``models.precision_for``.
        optim: the transformers optimizer name.
        attn_implementation: ``packed_sdpa`` (what training uses), ``sdpa`` (transformers'
            default) or ``flash_attention_2``.
        save_total_limit: checkpoints kept.
        stage: ``sft``, ``dpo`` (adds the frozen reference: a copy of the weights for ``full``, of the
            adapter for LoRA/QLoRA, as TRL keeps it) or ``orpo`` (no reference).
        ewc: full fine-tuning with an EWC penalty (``backend/ewc.py``): three fp32 copies of the
            weights (the base, the Fisher diagonal, and the penalty's difference kept for backward).
    """
    if method not in ("qlora", "lora", "full"):
        raise ValueError(f"method must be qlora, lora or full, not {method!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, not {device!r}")
    cpu = device == "cpu"
    t = _text_config(config)
    vocab, n_layers = t.vocab_size, t.num_hidden_layers
    inv = inventory(config, trust_remote_code)
    prec = precision_for(method, device)
    notes = []

    # static: weights, adapters, gradients, optimizer states
    targets = lora_targets(inv, target_modules) if method != "full" else []
    lora_count = sum(r * (i + o) for _, i, o in targets)
    trainable = inv.params if method == "full" else lora_count
    if method == "qlora":
        quantised = sum(i * o for name, i, o in inv.linears if name != inv.head)
        weights = round(quantised * NF4_BYTES_PER_PARAM) + (inv.params - quantised) * 4
    else:
        weights = inv.params * prec.weight_dtype.itemsize
    lora_params = lora_count * ADAPTER_BYTES
    gradients = trainable * 4
    optimizer = round(trainable * optimizer_bytes_per_param(optim))
    weight_copies = 0
    if method == "full" and prec.mixed:
        weight_copies = sum(i * o for _, i, o in inv.linears) * prec.compute_dtype.itemsize
    step_scratch = trainable * 4 if (not cpu and optim == "adamw_torch") else 0

    e = prec.compute_dtype.itemsize
    kept = seq_tokens if tokens_with_loss is None else tokens_with_loss
    activations = _activations(config, inv, targets, method=method, device=device, seq_tokens=seq_tokens,
                               kept=kept, r=r, lora_dropout=lora_dropout, attn_implementation=attn_implementation,
                               gradient_checkpointing=gradient_checkpointing)
    logits = 3 * 4 * kept * vocab
    heap = 0
    if cpu and method != "full":
        heap = round(CPU_HEAP_PER_LORA_OUTPUT * sum(o for _, _, o in targets) * 4 * seq_tokens)

    overhead = CPU_PROCESS_BYTES if cpu else CUDA_CONTEXT_BYTES
    reference = (weights if method == "full" else lora_params) if stage == "dpo" else 0
    ewc_bytes = 3 * trainable * 4 if ewc and method == "full" else 0
    static = weights + lora_params + gradients + optimizer + overhead + reference + ewc_bytes
    total = static + max(weight_copies + activations + logits + heap, step_scratch)

    if prec.notice:
        notes.append(prec.notice)
    if attn_implementation == "sdpa" and seq_tokens >= 4096:
        notes.append(f"the packed {seq_tokens}-token mask costs {n_layers * seq_tokens**2 * e / GiB:.1f} GiB "
                     f"over {n_layers} layers (SDPA); flash_attention_2 would avoid it")
    disk_ckpt, disk_result, disk_total = disk(inv.params, trainable, method, optim, save_total_limit)
    return Estimate(method=method, device=device, seq_tokens=seq_tokens, params=inv.params,
                    trainable=trainable, weights=weights, lora_params=lora_params, gradients=gradients,
                    optimizer=optimizer, weight_copies=weight_copies, activations=activations,
                    logits=logits, heap=heap, step_scratch=step_scratch, overhead=overhead, total=total,
                    disk_per_checkpoint=disk_ckpt, disk_result=disk_result, disk_total=disk_total,
                    reference=reference, ewc=ewc_bytes, notes=notes)


def _activations(config, inv: Inventory, targets, *, method: str, device: str, seq_tokens: int, kept: int, r: int,
                 lora_dropout: float, attn_implementation: str, gradient_checkpointing: bool) -> int:
    """Bytes kept for backward: the decoder layers, the final norm, and with gradient checkpointing
    the layer inputs and the packed block mask. ``kept``: positions projected onto the vocabulary."""
    prec = precision_for(method, device)
    e = prec.compute_dtype.itemsize
    h, n_layers = _text_config(config).hidden_size, _text_config(config).num_hidden_layers
    layer_targets = {rel for rel, _, _ in inv.layer_linears
                     if any(full.endswith("." + rel) for full, _, _ in targets)}
    layer = _layer_activation_bytes(config, inv.layer_linears, layer_targets, method=method, device=device,
                                    seq_tokens=seq_tokens, r=r, lora_dropout=lora_dropout,
                                    attn_implementation=attn_implementation)
    e_res = 4 if method in ("full", "qlora") or device == "cpu" else e
    activations = 4 * h * seq_tokens  # final norm input (fp32)
    if method == "full":
        activations += e_res * h * seq_tokens + e * h * kept  # its normalised input; lm_head's input
    if gradient_checkpointing:
        activations += n_layers * e_res * h * seq_tokens + layer
        if attn_implementation != "flash_attention_2":
            activations += seq_tokens * seq_tokens  # the bool block mask, kept for the recomputation
    else:
        activations += n_layers * layer
    return activations


def disk(params: int, trainable: int, method: str, optim: str, save_total_limit: int) -> tuple[int, int, int]:
    """(per checkpoint, result, all together) in bytes.

    A checkpoint holds the trained weights (LoRA: the fp32 adapter; full: fp32 weights, tied
    embeddings once), ``optimizer.pt`` and small files. The Trainer writes a new checkpoint
    before deleting the oldest, so ``save_total_limit + 1`` exist for a moment.
    """
    model_bytes = (params if method == "full" else trainable) * 4
    optimizer = round(trainable * optimizer_bytes_per_param(optim))
    per_checkpoint = model_bytes + optimizer + CHECKPOINT_EXTRA_BYTES
    result = model_bytes + CHECKPOINT_EXTRA_BYTES
    return per_checkpoint, result, result + (save_total_limit + 1) * per_checkpoint


def estimate_for_spec(spec, model_config=None, device: str | None = None, row_tokens: int | None = None,
                      seq_tokens: int | None = None, tokens_with_loss: int | None = None) -> Estimate:
    """The estimate for a RunSpec.

    A step packs ``per_device_train_batch_size`` rows into one. With ``row_tokens`` (e.g. the
    dataset's 95th-percentile row length) a step is taken as that many tokens per row; without it,
    as ``max_length`` per row: an upper bound. All tokens are counted as carrying loss (prompts do
    not, so this errs high) unless ``tokens_with_loss`` says how many do. ``seq_tokens`` gives a
    step's packed length directly (the benchmark's largest step). ``model_config`` defaults to the
    spec's model's config; ``device`` to this machine's.
    """
    from . import models
    from .ewc import active as ewc_active
    from .preference import is_preference, start_point

    spec = start_point(spec)  # from_run: the parent's base model and LoRA settings
    if model_config is None:
        from transformers import AutoConfig

        from .presets import model_config as shipped_config

        model_config = shipped_config(spec.model.model) or AutoConfig.from_pretrained(
            models.resolve_model(spec.model.model), **models.hub_kwargs(spec.model.trust_remote_code))
    t, lo = spec.train, spec.lora
    if seq_tokens is None:
        # a preference step holds the chosen and the rejected row of each pair, padded (TRL does not pack them)
        rows = t.per_device_train_batch_size * (2 if is_preference(spec) else 1)
        seq_tokens = rows * min(row_tokens or spec.data.max_length, spec.data.max_length)
    return estimate(model_config, spec.model.method, seq_tokens=seq_tokens, tokens_with_loss=tokens_with_loss,
                    r=lo.r, target_modules=lo.target_modules, lora_dropout=lo.lora_dropout,
                    gradient_checkpointing=t.gradient_checkpointing, device=device or models.device(),
                    optim=t.optim, save_total_limit=t.save_total_limit,
                    trust_remote_code=spec.model.trust_remote_code, stage=spec.model.stage,
                    ewc=ewc_active(spec))


# -- what this machine has ---------------------------------------------------------------------
def device_free_memory(device: str | None = None) -> tuple[int, int, str]:
    """(free bytes, total bytes, name) of the GPU, or of RAM (MemAvailable) on CPU."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return free, total, torch.cuda.get_device_name()
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024, "CPU RAM"
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page, "CPU RAM"


def free_disk(path: str | Path) -> int:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def peak_memory_mb(device: str | None = None) -> float:
    """This process's peak so far, MiB: CUDA's allocated peak, or on CPU the peak RSS (model load
    included; it never goes down within a process). ``device`` None: CUDA when available."""
    import resource

    import torch

    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
