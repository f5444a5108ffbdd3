"""A run's result as one GGUF file (llama.cpp, Ollama, LM Studio), checked against the studio's own answers.

``export_gguf(run_dir, path, quant="f16", ollama_dir=None)``
    1. The weights: a LoRA/QLoRA result merged into an fp32 copy of the base (``export.merged_model``,
       as the merge export does), a full run's model as trained; the recommended checkpoint unless
       one is named.
    2. The file, written with gguf-py (llama.cpp's own Python package): ``GGUFWriter`` for the
       format, ``TensorNameMap`` for the tensor names, ``gguf.quants`` for Q8_0/Q4_0, ``SpecialVocab``
       for merges and special tokens. The tokenizer and the run's chat template (its system prompt
       built in, ``export.run_tokenizer``) go into the metadata. llama.cpp's ``convert_hf_to_gguf.py``
       is not on PyPI (it lives in llama.cpp's repository; llama-cpp-python ships it only inside a
       source build), so the few steps it adds on top of gguf-py are done here.
    3. The parity check, on the file before it gets its name: transformers' GGUF loader reads it
       back (weights dequantised, tokenizer rebuilt from the file's own metadata) and answers up to
       ``PROMPTS`` of the run's validation prompts greedily; ``parity`` reports how many answers
       are token for token those of the in-app tuned model (``playground.load_run``). Llama 3.x rope
       scaling is written as llama.cpp's ``rope_freqs`` tensor (``rope_freqs``), which that loader
       skips: ``read_back`` applies it from the file, and the report says so. The loader also
       re-spells added tokens outside the byte alphabet (DeepSeek's BOS/EOS; ``_read_tokenizer`` puts
       them back from the file) and splits text with GPT-2's rules for a pre-tokenizer it does not
       know (``smollm``, ``deepseek-llm``): then only the compared prompts check the split, as the
       report's ``tokenizer`` says. A prompt
       rendered from the file's template that differs from training's by one byte, other BOS/EOS
       ids, other end-of-turn tokens, or other prompt tokens fail the export, naming which.
    4. ``ollama_dir``: an Ollama ``Modelfile`` beside it (``modelfile``): FROM the file, TEMPLATE the
       run's chat template as a Go template, PARAMETER stop the end-of-turn tokens, SYSTEM the run's
       system prompt, the Playground's sampling defaults.

The file is written under a temporary name beside ``path`` and renamed at the end: a failure (no
disk space, an unsupported model, a parity mismatch) leaves no half-written file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from . import export, template
from .export import ExportError
from .runs import RunFolder

QUANTS = ("f16", "q8_0", "q4_0")  # what gguf.quants can write (K-quants there only dequantise)
ARCHITECTURES = ("llama", "qwen2")  # transformers model_type: Llama family (SmolLM2, Llama 3, DeepSeek-LLM), Qwen2/2.5
# the rope scaling each writes: llama3 as a rope_freqs tensor (Llama 3.1-3.3), as llama.cpp's converter does
ROPE_TYPES = {"llama": ("default", "llama3"), "qwen2": ("default",)}
PROMPTS = 8
MAX_NEW_TOKENS = 48
# The Playground's defaults (ui/playground_tab.py) as Ollama parameters.
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 50, "repeat_penalty": 1.0, "num_predict": 128}


# -- what to write --------------------------------------------------------------------------------
def _architecture(config) -> str:
    if config.model_type not in ARCHITECTURES:
        names = ", ".join(config.architectures or []) or config.model_type
        raise ExportError(f"GGUF export supports the Llama family and Qwen2/2.5 ({', '.join(ARCHITECTURES)}), "
                          f"not {config.model_type} ({names})")
    rope = _rope_type(config)
    if rope not in ROPE_TYPES[config.model_type]:
        raise ExportError(f"GGUF export does not handle {rope!r} rope scaling of {config.model_type} models yet "
                          f"(it handles {', '.join(ROPE_TYPES[config.model_type])})")
    return config.model_type


def _rope_type(config) -> str:
    return (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")


def rope_freqs(config) -> np.ndarray | None:
    """Llama 3.x rope scaling (``rope_type: llama3``) as llama.cpp's converter writes it: one factor per
    rotary frequency (``rope_freqs.weight``, f32), by which llama.cpp divides that frequency: 1 for
    wavelengths under ``original_max_position_embeddings / high_freq_factor``, ``factor`` above
    ``original_max_position_embeddings / low_freq_factor``, smoothly between. None for other models.
    (llama.cpp's ``convert_hf_to_gguf.py``, ``LlamaModel.generate_extra_tensors``; its defaults.)"""
    if _rope_type(config) != "llama3":
        return None
    rope = config.rope_parameters
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _weights_config(spec, weights: Path):
    from transformers import AutoConfig

    from . import models

    source = weights if spec.model.method == "full" else models.resolve_model(spec.model.model)
    with models.load_errors(str(source)):
        return AutoConfig.from_pretrained(source, **models.hub_kwargs(spec.model.trust_remote_code))


def _load_weights(spec, weights: Path):
    """The fp32 model to write: merged for LoRA/QLoRA, as trained for full runs."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import models

    if spec.model.method != "full":
        return export.merged_model(spec, weights, "float32")
    with models.load_errors(str(weights)):
        return AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, use_safetensors=True)


def _qtype(name: str, data: np.ndarray, quant: str):
    """The GGML type of one tensor: norms and biases stay f32, as llama.cpp's converter keeps them;
    with q4_0 the embedding/output matrix gets q8_0, since it decides every token (llama.cpp's
    quantizer also keeps it at more bits); rows that do not fill whole blocks fall back to f16."""
    Q = gguf.GGMLQuantizationType
    if data.ndim == 1:
        return Q.F32
    wanted = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    if wanted == Q.Q4_0 and name.startswith(("token_embd.", "output.")):
        wanted = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if data.shape[-1] % block == 0 else Q.F16


def _rope_interleave(w: np.ndarray, heads: int) -> np.ndarray:
    # transformers' Llama rotates the two halves of each head, GGML's rope rotates neighbouring
    # pairs: the inverse of what transformers' GGUF loader undoes (LlamaTensorProcessor)
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, arch: str, quant: str):
    """(GGUF name, fp32 array, GGML type) for each tensor to write, in the model's order."""
    config = model.config
    names = gguf.get_tensor_name_map(_gguf_arch(arch), config.num_hidden_layers)
    out = []
    factors = rope_freqs(config)
    if factors is not None:  # first, as llama.cpp's converter writes its extra tensors
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors, gguf.GGMLQuantizationType.F32))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when the file has no output tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for the tensor {hf_name} of this {arch} model")
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            data = _rope_interleave(data, heads)
        out.append((name, data, _qtype(name, data, quant)))
    return out


def _gguf_arch(arch: str):
    return {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]


def _nbytes(shape, qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def estimate_bytes(config, tokenizer_bytes: int, quant: str) -> int:
    """The file's size from the model's shape alone: every matrix at the type it will get (the
    embedding counted once when tied), plus the vocabulary as the tokenizer's files hold it."""
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = [(heads * head_dim, hidden), (kv * head_dim, hidden), (kv * head_dim, hidden), (hidden, heads * head_dim),
                 (config.intermediate_size, hidden), (config.intermediate_size, hidden), (hidden, config.intermediate_size)]
    matrices = [("blk.", shape) for shape in per_layer] * layers + [("token_embd.", (vocab, hidden))]
    if not config.tie_word_embeddings:
        matrices.append(("output.", (vocab, hidden)))
    total = sum(_nbytes(shape, _qtype(name, np.empty((1, shape[1]), np.float32), quant)) for name, shape in matrices)
    vectors = (2 * layers + 1) * hidden * 4  # the norms, f32
    if _rope_type(config) == "llama3":
        vectors += head_dim // 2 * 4  # rope_freqs
    return total + vectors + tokenizer_bytes


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ExportError(f"not enough disk space in {folder}: the GGUF file needs about {needed / 1e6:.0f} MB, "
                          f"{free / 1e6:.0f} MB are free")


# -- the tokenizer -------------------------------------------------------------------------------
# DeepSeek-LLM's pre_tokenizer (deepseek-llm-7b/67b, also DeepSeek-V2's), step for step as its tokenizer.json
# holds it; llama.cpp names it "deepseek-llm" and splits with the same five patterns (llama-vocab.cpp). The
# letter class is written as code points: it holds canonical singletons (U+1F7D, U+2126, U+212A...) that an
# editor's Unicode normalisation would silently change.
_DEEPSEEK_LLM_LETTER_RANGES = (  # the letter class's ranges in its order; a single code point is (x, x)
    (0x0041, 0x005A), (0x0061, 0x007A), (0x00B5, 0x00B5), (0x00C0, 0x00D6), (0x00D8, 0x00F6), (0x00F8, 0x01BA),
    (0x01BC, 0x01BF), (0x01C4, 0x0293), (0x0295, 0x02AF), (0x0370, 0x0373), (0x0376, 0x0376), (0x0377, 0x0377),
    (0x037B, 0x037D), (0x037F, 0x037F), (0x0386, 0x0386), (0x0388, 0x038A), (0x038C, 0x038C), (0x038E, 0x03A1),
    (0x03A3, 0x03F5), (0x03F7, 0x0481), (0x048A, 0x052F), (0x0531, 0x0556), (0x10A0, 0x10C5), (0x13A0, 0x13F5),
    (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A),
    (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59),
    (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE),
    (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4),
    (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D),
    (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139),
    (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2183), (0x2184, 0x2184), (0x2C00, 0x2C7B),
    (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF2), (0x2CF3, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B),
    (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17),
    (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB),
    (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943),
)
_DEEPSEEK_LLM_LETTERS = "\\s?[" + "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}"
                                           for a, b in _DEEPSEEK_LLM_LETTER_RANGES) + "]+"
DEEPSEEK_LLM_PRE = [
    *({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False} for pattern in (
        "[\r\n]", _DEEPSEEK_LLM_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        "\\s+$", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+")),
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
]


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for how the text is split before BPE, read from the tokenizer's own
    ``pre_tokenizer`` (llama.cpp's converter hashes a sample instead; its table is not in gguf-py)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # the GPT-2 split (the embedded SmolLM2 as the studio rebuilt it from its GGUF)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM2 as published
    if steps == DEEPSEEK_LLM_PRE:
        return "deepseek-llm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = steps[0].get("pattern", {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if pattern == GGUF_PRE_TOKENIZER_SPLITS[name]:
                return name
    raise ExportError(f"the tokenizer splits text in a way GGUF export does not recognise "
                      f"({json.dumps(pre)[:200]}): llama.cpp would tokenize differently")


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The byte-level BPE vocabulary, its merges and special tokens, and the run's chat template.
    Token types as llama.cpp's converter sets them: added tokens are CONTROL when special, else
    USER_DEFINED; ids the tokenizer does not use up to the model's vocab size are UNUSED padding."""
    with tempfile.TemporaryDirectory(prefix="studio-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_json = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        model, decoder = tokenizer_json.get("model", {}), tokenizer_json.get("decoder") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
            raise ExportError(f"GGUF export handles byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen2), "
                              f"not this {model.get('type')} tokenizer")
        pre = _pre_tokenizer(tokenizer_json)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((T.CONTROL if added[i].special else T.USER_DEFINED) if i in added else T.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.chat_template = tokenizer.chat_template  # the run's, with its system prompt built in
    # training tokenized rendered text without adding special tokens: any BOS is the template's own
    special.add_special_token = {"bos": False, "eos": False}
    special.add_to_gguf(writer, quiet=True)


# -- writing --------------------------------------------------------------------------------------
def write_gguf(model, tokenizer, path: Path, quant: str, name: str, progress=None) -> None:
    """Write ``model`` (a supported architecture) and ``tokenizer`` to ``path``, one tensor at a time."""
    config = model.config
    arch = _architecture(config)
    tensors = _tensors(model, arch, quant)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[_gguf_arch(arch)])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_rope_dimension_count(getattr(config, "head_dim", None)
                                        or config.hidden_size // config.num_attention_heads)
        writer.add_vocab_size(config.vocab_size)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for tname, data, qtype in tensors:
            writer.add_tensor_info(tname, data.shape, np.dtype(np.float32), _nbytes(data.shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (tname, data, qtype) in enumerate(tensors):
            writer.write_tensor_data(gguf.quants.quantize(data, qtype))
            if progress and (i + 1) % max(1, len(tensors) // 10) == 0:
                progress((i + 1) / len(tensors), f"wrote {i + 1} of {len(tensors)} tensors")
    finally:
        writer.close()


# -- parity ---------------------------------------------------------------------------------------
def _greedy(model, ids: list[int], stop_ids: set[int], pad: int) -> list[int]:
    """A greedy answer's token ids: batch of one, no padding, so both models see the same input."""
    import torch

    prompt = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=sorted(stop_ids), pad_token_id=pad)
    return out[0, len(ids):].tolist()


def _conversations(prompts: list[dict]) -> list[list[dict]]:
    """Each prompt alone, and one multi-turn conversation of the first two (the first answered)."""
    convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    if len(prompts) > 1:
        convs.append([{"role": "user", "content": prompts[0]["prompt"]},
                      {"role": "assistant", "content": prompts[0]["reference"] or "OK."},
                      {"role": "user", "content": prompts[1]["prompt"]}])
    return convs


def _read_tokenizer(gguf_path: Path):
    """transformers' tokenizer for the file, with what its GGUF loader gets wrong put back from the file's
    own token list: ``(tokenizer, note or None)``. The loader re-spells added tokens whose text is not
    in the byte-level alphabet (DeepSeek's ``<｜begin▁of▁sentence｜>``: it takes them for a llama.cpp
    mislabel) and then adds the BOS/EOS the file names once more as new tokens; llama.cpp matches
    them as the file writes them. Here they get back their text and their ids."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    fields = gguf.GGUFReader(gguf_path).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    alphabet, T = set(bytes_to_unicode().values()), gguf.TokenType
    added = {i: (text, kind == T.CONTROL) for i, (text, kind) in enumerate(zip(tokens, types))
             if kind in (T.CONTROL, T.USER_DEFINED) and not set(text) <= alphabet}
    if not added:
        return tok, None
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    spelled = {i: text for text, i in vocab.items()}
    for i, (text, _) in added.items():
        vocab.pop(spelled.get(i), None)
        vocab[text] = i
    state["added_tokens"] = [a for a in state["added_tokens"] if a["id"] < len(tokens) and a["id"] not in added] + [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": special} for i, (text, special) in sorted(added.items())]
    tok._tokenizer = Tokenizer.from_str(json.dumps(state))
    names = ", ".join(text for text, _ in list(added.values())[:3])
    return tok, (f"transformers' GGUF loader re-spells {len(added)} added token(s) outside the byte alphabet "
                 f"({names}); the reader uses them as the file lists them")


def _reader_split(gguf_path: Path) -> str:
    """How transformers' GGUF loader splits text before BPE for this file: as the file's
    ``tokenizer.ggml.pre`` says where it knows that name, else with GPT-2's split. Then only the
    prompt-token comparison checks the split, on the prompts compared, and the report says so."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    pre = field.contents() if field is not None else "default"
    if pre == "gpt-2" or pre in GGUF_PRE_TOKENIZER_SPLITS:
        return f"{pre}: the reader splits as the file says"
    return (f"{pre}: transformers' GGUF loader does not know {pre!r} and splits with GPT-2's split; the "
            f"prompts' tokens were compared")


def read_back(gguf_path: Path):
    """The file as transformers' GGUF loader reads it, with what that loader leaves out put back from
    the file itself: ``(model, rope)``. The loader skips ``rope_freqs.weight`` (Llama 3.x rope scaling)
    and so would answer with unscaled rope; here each rotary frequency it computes from the file's
    ``rope.freq_base`` and ``rope.dimension_count`` is divided by the file's factor, as llama.cpp does.
    ``rope`` says so ("llama3: ...") or is "default" for a file without the tensor."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    factors = next((np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(gguf_path).tensors
                    if t.name == name), None)
    if factors is None:
        return model, "default"
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or rotary.rope_type != "default" or rotary.inv_freq.shape != factors.shape:
        raise ExportError(f"the file's {name} cannot be applied to transformers' reading of it "
                          f"({getattr(rotary, 'rope_type', 'no rotary embedding')}, {factors.shape[0]} factors)")
    scaled = rotary.inv_freq / torch.from_numpy(factors).to(rotary.inv_freq.device)
    rotary.inv_freq, rotary.original_inv_freq = scaled, scaled.clone()
    return model, (f"llama3: the file's {name} ({factors.min():g} to {factors.max():g}) applied to transformers' "
                   f"reader, whose GGUF loader skips it")


def parity(gguf_path: Path, loaded, prompts: list[dict], progress=None) -> dict:
    """Read ``gguf_path`` back with transformers and compare it with ``loaded`` (the in-app run).

    Raises ``ExportError`` on a template, BOS/EOS, stop-token or prompt-token mismatch; returns
    ``{"prompts", "same", "share", "tokens_alike" (the mean share of the in-app answer's tokens before
    the first difference), "differs": [prompts answered differently], "template": "identical",
    "rope": how the reader got the file's rope (``read_back``), "tokenizer": how it splits text}``.
    """
    reader_tok, respelled = _read_tokenizer(gguf_path)
    train_tok, system = loaded.tokenizer, loaded.spec.data.system_prompt
    problems = []
    for what in ("bos_token_id", "eos_token_id"):
        if getattr(reader_tok, what) != getattr(train_tok, what):
            problems.append(f"{what.split('_')[0].upper()} differs (file {getattr(reader_tok, what)}, "
                            f"training {getattr(train_tok, what)})")
    stops, reader_stops = template.end_of_turn_ids(train_tok), template.end_of_turn_ids(reader_tok)
    if reader_stops != stops:
        problems.append(f"end-of-turn tokens differ (file {sorted(reader_stops)}, training {sorted(stops)})")
    convs = _conversations(prompts)
    for conv in convs:
        text = template.render(train_tok, conv, system, add_generation_prompt=True)
        # as llama.cpp does: the file's template with no system message (it brings the run's own),
        # tokenized with whatever special tokens the file says to add
        file_text = reader_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        if file_text != text:
            at = next((i for i, (a, b) in enumerate(zip(file_text, text)) if a != b), min(len(file_text), len(text)))
            problems.append(f"the file's chat template renders {file_text[at:at + 40]!r} at character {at}, "
                            f"training rendered {text[at:at + 40]!r}")
            break
        if reader_tok(file_text)["input_ids"] != template.prompt_ids(train_tok, conv, system):
            problems.append(f"the file's tokenizer gives other prompt tokens for {conv[-1]['content'][:40]!r}")
            break
    if problems:
        raise ExportError("the GGUF file does not match training: " + "; ".join(problems))
    split = "; ".join(n for n in (_reader_split(gguf_path), respelled) if n)

    reader, rope = read_back(gguf_path)
    tuned, context = loaded.model_for("tuned")
    pad = next(t for t in (train_tok.pad_token_id, train_tok.eos_token_id, 0) if t is not None)
    stop_ids = stops | {train_tok.eos_token_id}
    differs, alike = [], []
    for i, conv in enumerate(convs[:len(prompts)]):
        ids = template.prompt_ids(train_tok, conv, system)
        with loaded.lock, context:
            app = _greedy(tuned, ids, stop_ids, pad)
        answer = _greedy(reader, ids, stop_ids, pad)
        if answer != app:
            differs.append(conv[-1]["content"])
        # how far the answers go together: the share of the in-app answer's tokens before the first difference
        common = next((k for k, (a, b) in enumerate(zip(answer, app)) if a != b), min(len(answer), len(app)))
        alike.append(common / len(app) if app else float(answer == app))
        if progress:
            progress((i + 1) / len(prompts), f"parity: {i + 1 - len(differs)} of {i + 1} prompts answered alike")
    same = len(prompts) - len(differs)
    return {"prompts": len(prompts), "same": same, "share": round(same / len(prompts), 3) if prompts else None,
            "tokens_alike": round(sum(alike) / len(alike), 3) if alike else None,
            "differs": differs, "template": "identical", "reader": "transformers", "rope": rope, "tokenizer": split}


# -- Ollama ---------------------------------------------------------------------------------------
_SENTINELS = {"system": "SYSTEM-7f3a", "user": "USER-7f3a", "assistant": "ASSISTANT-7f3a", "user2": "USER2-7f3a"}


def _go(text: str) -> str:
    # a Go string literal (JSON's escapes are Go's): literal text never meets the template's own syntax
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(tokenizer) -> str:
    """The run's chat template as an Ollama (Go text/template) TEMPLATE: what each role's turn puts
    around its content, read off the chat template by rendering marked messages, then checked on a
    multi-turn conversation. A template whose turns depend on more than their role is refused."""
    S, U, A, U2 = (_SENTINELS[k] for k in ("system", "user", "assistant", "user2"))

    def render(roles_contents, gen=False):
        msgs = [{"role": r, "content": c} for r, c in roles_contents]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def around(text, content):
        before, sep, after = text.partition(content)
        if not sep:
            raise ExportError("the chat template does not show message content as given: it cannot be an Ollama TEMPLATE")
        return before, after

    s = render([("system", S)])
    su = render([("system", S), ("user", U)])
    sua = render([("system", S), ("user", U), ("assistant", A)])
    sp, ss = around(s, S)
    up, us = around(su[len(s):], U)
    ap, as_ = around(sua[len(su):], A)
    gen = render([("system", S), ("user", U)], gen=True)[len(su):]
    alone = render([("user", U)])
    default = alone[:len(alone) - len(up + U + us)]  # what the template adds when a chat has no system message
    expected = sp + S + ss + up + U + us + ap + A + as_ + up + U2 + us + gen
    if not (su.startswith(s) and sua.startswith(su) and alone.endswith(up + U + us)
            and render([("system", S), ("user", U), ("assistant", A), ("user", U2)], gen=True) == expected):
        raise ExportError("the chat template's turns depend on more than their role: it cannot be an Ollama TEMPLATE")
    return (
        "{{- range $i, $m := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        f"{{{{- if and (eq $i 0) (ne $m.Role \"system\") }}}}{_go(default)}{{{{ end }}}}\n"
        f"{{{{- if eq $m.Role \"system\" }}}}{_go(sp)}{{{{ $m.Content }}}}{_go(ss)}\n"
        f"{{{{- else if eq $m.Role \"user\" }}}}{_go(up)}{{{{ $m.Content }}}}{_go(us)}"
        f"{{{{ if $last }}}}{_go(gen)}{{{{ end }}}}\n"
        f"{{{{- else if eq $m.Role \"assistant\" }}}}{_go(ap)}{{{{ $m.Content }}}}{_go(as_)}\n"
        "{{- end }}\n"
        "{{- end }}"
    )


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ExportError('the text contains """, which an Ollama Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_path: Path, folder: Path, tokenizer, system_prompt: str | None) -> str:
    """An Ollama Modelfile for ``gguf_path``, written in ``folder``: its text."""
    stops = sorted(tokenizer.convert_ids_to_tokens(sorted(template.end_of_turn_ids(tokenizer))))
    source = os.path.relpath(gguf_path, folder)
    source = source if source.startswith("..") else f"./{source}"  # a path, never read as a model's name
    lines = [f"FROM {source}", f"TEMPLATE {_quoted(go_template(tokenizer))}"]
    if system_prompt:
        lines.append(f"SYSTEM {_quoted(system_prompt)}")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines += [f"PARAMETER {key} {value}" for key, value in SAMPLING.items()]
    return "\n".join(lines) + "\n"


# -- the export -----------------------------------------------------------------------------------
def export_gguf(run_dir, path, quant: str = "f16", ollama_dir=None, checkpoint: str | None = None,
                prompts: int | None = None, progress=None) -> dict:
    """Write the run's result to the GGUF file ``path`` (and a Modelfile into ``ollama_dir``),
    check it (``parity``) and return what was done: paths, sizes, seconds and the parity.

    ``checkpoint``: a checkpoint name, ``"result"``, or None for the recommended checkpoint.
    ``progress(fraction, text)`` is called as the export goes on."""
    from . import advisor, playground

    t0 = time.time()
    say = progress or (lambda fraction, text: None)
    if quant not in QUANTS:
        raise ExportError(f"quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise ExportError(f"{path} is a folder: give the GGUF file's name")
    checkpoint = playground.resolve_checkpoint(run_dir, checkpoint)
    weights = playground.result_dir(run_dir, checkpoint)  # refuses a run without a result
    spec = RunFolder(run_dir).spec()
    config = _weights_config(spec, weights)
    _architecture(config)
    tokenizer = export.run_tokenizer(spec)
    folder = None if ollama_dir is None else Path(ollama_dir).expanduser().resolve()
    ollama = None if folder is None else modelfile(path, folder, tokenizer, spec.data.system_prompt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_bytes = len(json.dumps(tokenizer.get_vocab())) * 2  # tokens and merges, about the same size
    estimate = estimate_bytes(config, tokenizer_bytes, quant)
    _check_disk(path.parent, int(estimate * 1.05))
    say(0.05, f"estimated {estimate / 1e6:.1f} MB; merging {weights.name}" if spec.model.method != "full"
        else f"estimated {estimate / 1e6:.1f} MB; loading {weights.name}")
    loaded = playground.load_run(run_dir, checkpoint or advisor.RESULT)  # the in-app model, for the parity
    model = _load_weights(spec, weights)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.gguf")  # no half-written file under the real name
    try:
        write_gguf(model, tokenizer, tmp, quant, f"{Path(run_dir).name} ({spec.model.method})",
                   progress=lambda f, text: say(0.1 + 0.5 * f, text))
        del model
        written = time.time() - t0
        say(0.6, f"wrote {tmp.stat().st_size / 1e6:.1f} MB; reading it back with transformers")
        rows = playground.default_prompts(run_dir, limit=prompts or PROMPTS)
        result = parity(tmp, loaded, rows, progress=lambda f, text: say(0.6 + 0.4 * f, text))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    report = {"gguf": str(path), "quant": quant, "bytes": path.stat().st_size, "estimated_bytes": estimate,
              "checkpoint": checkpoint or advisor.RESULT, "method": spec.model.method,
              "write_seconds": round(written, 1), "seconds": round(time.time() - t0, 1), "parity": result}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Modelfile").write_text(ollama, encoding="utf-8")
        report["modelfile"] = str(folder / "Modelfile")
    say(1.0, summary(report))
    return report


def summary(report: dict) -> str:
    """One line on the parity, for the CLI and the Export tab."""
    p = report["parity"]
    return (f"{report['quant']}: {p['same']} of {p['prompts']} validation prompts answered token for token like "
            f"the in-app tuned model ({p['share']:.0%}; {p['tokens_alike']:.0%} of their tokens before the first "
            f"difference); chat template, BOS/EOS and stop tokens identical; "
            + ("" if p.get("rope", "default") == "default" else f"rope scaling {p['rope']}; ")
            + ("" if "does not know" not in p.get("tokenizer", "") else f"pre-tokenizer {p['tokenizer']}; ") +
            f"{report['bytes'] / 1e6:.1f} MB in {report['seconds']:.0f} s")
