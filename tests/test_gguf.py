"""backend/gguf_export.py: GGUF files read back by transformers answer like the studio; the Modelfile's
TEMPLATE renders what training rendered; bad input fails cleanly, leaving no file."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import serve, tiny_spec

from backend import export, gguf_export, models, template
from backend import train as train_mod
from backend.__main__ import main
from backend.config import RunSpec
from backend.playground import RunError
from backend.runs import RunFolder

SYSTEM = "Tu es Zed. 🙂 你好"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, tiny_data):
    """A tiny LoRA run with a system prompt (the file's template must carry it) and a validation split."""
    spec = tiny_spec(tiny_model_dir, tiny_data, max_steps=4, system_prompt=SYSTEM, val_size=0.25)
    return train_mod.train(spec, tmp_path_factory.mktemp("gguf") / "run").path


def only(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


# -- a Go text/template subset, as Ollama renders a TEMPLATE ------------------------------------
_ACTION = re.compile(r'\{\{(-?)\s*((?:[^"}]|"(?:[^"\\]|\\.)*"|\}(?!\}))*?)\s*(-?)\}\}', re.S)
_TERM = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|[$.\w]+')
_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not a,
    "and": lambda *a: next((x for x in a if not x), a[-1]), "or": lambda *a: next((x for x in a if x), a[-1]),
    "len": len, "slice": lambda x, i: x[i:], "index": lambda x, i: x[i],
}


def go_render(source: str, data: dict) -> str:
    """Render ``source`` with Go's text/template rules for what ``gguf_export.go_template`` uses:
    trim markers, string literals, variables, fields, range, if / else if / else, and the builtins above."""
    items, pos, trim = [], 0, False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        text = text.lstrip() if trim else text
        items.append(("text", text.rstrip() if m.group(1) else text))
        items.append(("act", m.group(2)))
        pos, trim = m.end(), bool(m.group(3))
    items.append(("text", source[pos:].lstrip() if trim else source[pos:]))
    out, scope = [], {"$": data}

    def value(term):
        if term.startswith('"'):
            return json.loads(term)
        if term.isdigit():
            return int(term)
        head, *fields = term.split(".")
        obj = scope[head or "$"]  # ".X" reads the data itself: the TEMPLATE uses it outside range only
        for f in (f for f in fields if f):
            obj = obj[f]
        return obj

    def call(terms):
        args, i = [], 0
        while i < len(terms):
            if terms[i] == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(terms[j], 0)
                    j += 1
                args.append(call(terms[i + 1:j - 1]))
                i = j
            else:
                args.append(terms[i] if terms[i] in _FUNCS else value(terms[i]))
                i += 1
        return _FUNCS[args[0]](*args[1:]) if isinstance(args[0], str) and args[0] in _FUNCS and \
            not terms[0].startswith('"') else args[0]

    def block(i, emit=True):
        """Run items from ``i`` until an unmatched end/else; returns (index of it, its text)."""
        while i < len(items):
            kind, body = items[i]
            if kind == "text":
                out.append(body) if emit else None
                i += 1
            elif body == "end" or body.startswith("else"):
                return i, body
            elif body.startswith("range "):
                names, expr = body[6:].split(":=")
                var_i, var_m = [n.strip() for n in names.split(",")]
                seq = call(_TERM.findall(expr))
                end = i + 1
                for k, elem in enumerate(seq if emit else []):
                    scope[var_i], scope[var_m] = k, elem
                    end, _ = block(i + 1)
                i = (block(i + 1, emit=False)[0] if not (emit and seq) else end) + 1
            elif body.startswith("if "):
                taken, cond = False, call(_TERM.findall(body[3:]))
                i, stop = block(i + 1, emit and bool(cond))
                taken = bool(cond)
                while stop != "end":
                    branch = stop == "else" or (not taken and call(_TERM.findall(stop[len("else if "):])))
                    i, stop = block(i + 1, emit and not taken and bool(branch))
                    taken = taken or bool(branch)
                i += 1
            elif ":=" in body:
                name, expr = body.split(":=")
                scope[name.strip()] = call(_TERM.findall(expr)) if emit else None
                i += 1
            else:
                out.append(str(call(_TERM.findall(body)))) if emit else None
                i += 1
        return i, None

    block(0)
    return "".join(out)


def ollama_prompt(modelfile: str, messages: list[dict]) -> str:
    """What Ollama's chat endpoint renders: the Modelfile's SYSTEM first unless the chat brings its
    own system message, then the TEMPLATE over .Messages."""
    tmpl = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.S | re.M)
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system.group(1)}, *messages]
    return go_render(tmpl, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I am Zed.\n\nHello!"},
     {"role": "user", "content": "你是谁？ {{ .Content }} \"quoted\""}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "🙂"}],
]


def test_go_renderer_follows_go_rules():
    """The test's renderer itself, on what Go's text/template gives for these (trim markers, else if, $last)."""
    src = ('{{- range $i, $m := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
           '{{- if eq $m.Role "a" }}{{ "A:" }}{{ $m.Content }}\n{{- else if eq $m.Role "b" }}B {{ $m.Content }}'
           '{{ if $last }}{{ "!" }}{{ end }}\n{{- else }}?{{- end }}\n{{- end }}')
    msgs = [{"Role": r, "Content": c} for r, c in (("a", "x"), ("b", "y"), ("c", "z"), ("b", "w"))]
    assert go_render(src, {"Messages": msgs}) == "A:xB y?B w!"


# -- the file -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """f16 and q8_0 exports of the run (q4_0 goes through the CLI below), each with its Modelfile
    and the progress lines it gave; tests read them, so each file is written and checked once."""
    out = {}
    for quant in ("f16", "q8_0"):
        folder = tmp_path_factory.mktemp(quant)
        lines = []
        report = gguf_export.export_gguf(run, folder / "model.gguf", quant, ollama_dir=folder / "ollama",
                                         prompts=PROMPTS, progress=lambda f, text: lines.append(text))
        out[quant] = report, folder, lines
    return out


PROMPTS = 3  # validation prompts in the parity check (a random model never stops early: 48 tokens each)


def check_file(report: dict, folder: Path, quant: str, run) -> None:
    """The file as gguf-py reads it: the types asked for, tied embeddings, the run's chat template;
    and the parity the export measured."""
    import gguf

    path = Path(report["gguf"])
    assert report["bytes"] == path.stat().st_size and path.parent == folder
    assert 0.85 < report["estimated_bytes"] / report["bytes"] < 1.15, report
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    wanted = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[quant]
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == wanted
    assert types["token_embd.weight"] == ("Q8_0" if quant == "q4_0" else wanted)
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied embeddings
    tok = export.run_tokenizer(RunFolder(run).spec())
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template and SYSTEM in tok.chat_template
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    parity = report["parity"]
    assert parity["template"] == "identical" and parity["prompts"] == PROMPTS
    print(f"\n{quant}: {parity['same']} of {parity['prompts']} answered alike, {report['bytes'] / 1e6:.1f} MB, "
          f"{report['seconds']} s")


def as_written(weight: torch.Tensor) -> torch.Tensor:
    """A weight as an f16 file holds it: matrices rounded to f16, norms and biases kept in f32."""
    return weight if weight.ndim == 1 else weight.half().float()


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_each_type_round_trips_through_transformers(exported, run, quant):
    report, folder, lines = exported[quant]
    assert only(folder) == ["model.gguf", "ollama"]  # no temporary file left
    check_file(report, folder, quant, run)
    assert any("parity" in line for line in lines) and any("tensors" in line for line in lines)
    if quant == "f16":
        assert report["parity"]["share"] == 1.0, report["parity"]


def test_the_f16_file_holds_the_merged_weights(exported, run):
    """Read independently of the export's own check: every weight transformers loads from the file
    equals the merged model's as an f16 file holds it (so the rope permutation and the names are right)."""
    from transformers import AutoModelForCausalLM

    path = Path(exported["f16"][0]["gguf"])
    merged = export.merged_model(RunFolder(run).spec(), Path(run) / "adapter", "float32").state_dict()
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    assert merged.keys() == back.keys()
    for name, weight in merged.items():
        torch.testing.assert_close(back[name], as_written(weight), rtol=0, atol=0, msg=name)


def test_a_full_run_of_a_qwen2_model_exports_as_trained(tmp_path, tokenizer, tiny_data):
    """Qwen2 (attention biases, no rope permutation) through the full fine-tuning path: the trained
    weights themselves go into the file, and the file answers like the in-app model."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.2)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    run = train_mod.train(tiny_spec(tmp_path / "qwen2", tiny_data, method="full", max_steps=2, val_size=0.25),
                          tmp_path / "run").path
    report = gguf_export.export_gguf(run, tmp_path / "q.gguf", "f16", prompts=2)
    assert report["parity"]["share"] == 1.0 and report["method"] == "full"
    trained = AutoModelForCausalLM.from_pretrained(Path(run) / "model", dtype=torch.float32).state_dict()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32)
    assert back.config.model_type == "qwen2"
    back = back.state_dict()
    assert trained.keys() == back.keys() and any(name.endswith("q_proj.bias") for name in back)
    for name, weight in trained.items():
        torch.testing.assert_close(back[name], as_written(weight), rtol=0, atol=0, msg=name)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # short, so that prompts of this test reach the scaled band


def test_llama3_rope_scaling_goes_into_rope_freqs_and_the_parity_reads_it_back(tmp_path, tokenizer, tiny_data):
    """Llama 3.x rope scaling: the file carries llama.cpp's rope_freqs tensor, equal to the ratio of
    transformers' own unscaled and llama3 frequencies; transformers' GGUF loader skips that tensor,
    so the parity check applies it from the file (and says so), and without it the reader would not
    answer like the in-app model: the check is not vacuous."""
    import gguf
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.2,
                         rope_scaling=dict(LLAMA3_ROPE))
    assert config.rope_parameters["rope_type"] == "llama3"
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama3")
    tokenizer.save_pretrained(tmp_path / "llama3")
    run = train_mod.train(tiny_spec(tmp_path / "llama3", tiny_data, max_steps=2, val_size=0.25), tmp_path / "run").path
    report = gguf_export.export_gguf(run, tmp_path / "l3.gguf", "f16", prompts=2)
    assert report["parity"]["share"] == 1.0, report["parity"]
    assert report["parity"]["rope"].startswith("llama3: the file's rope_freqs.weight")
    assert "rope scaling llama3" in gguf_export.summary(report)
    assert 0.85 < report["estimated_bytes"] / report["bytes"] < 1.15, report

    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "l3.gguf").tensors}
    freqs = tensors["rope_freqs.weight"]
    assert freqs.tensor_type.name == "F32" and list(freqs.shape) == [8]
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(torch.from_numpy(freqs.data.copy()), plain / scaled, rtol=1e-5, atol=0)
    assert float(freqs.data.min()) == 1.0 and float(freqs.data.max()) == 8.0  # all three bands present

    merged = export.merged_model(RunFolder(run).spec(), Path(run) / "adapter", "float32").eval()
    ids = torch.tensor([tokenizer("Who are you? " * 20)["input_ids"]])  # past the original 64 positions
    assert ids.shape[1] > 64
    read, _ = gguf_export.read_back(tmp_path / "l3.gguf")
    unscaled = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="l3.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        want = merged(ids).logits
        near, far = ((m(ids).logits - want).abs().max().item() for m in (read, unscaled))
    print(f"\nllama3 rope: logits differ by {near:.2e} with the file's rope_freqs, {far:.2e} without")
    assert near < 0.05 and far > 20 * near


# deepseek-llm-7b-chat's chat template (tokenizer_config.json)
DEEPSEEK_TEMPLATE = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
                     "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                     "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
                     "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
                     "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
DEEPSEEK_PROBE = ("User: Who are you? (12)\n\nAssistant: I am Zed, made by Qux Labs. 🙂 2024-12-01, 3.14\n"
                  "  Ωmega ώ Kelvin  你是谁？ 한국어\tTab   trailing   ")


def deepseek_tokenizer(texts):
    """A tiny byte-level BPE trained here with DeepSeek-LLM's pre_tokenizer, BOS/EOS and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(step["pattern"]["Regex"]), "isolated")
         for step in gguf_export.DEEPSEEK_LLM_PRE if step["type"] == "Split"]
        + [pre_tokenizers.Digits(individual_digits=True),
           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=[bos, eos],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   chat_template=DEEPSEEK_TEMPLATE)


def test_a_deepseek_llm_tokenizer_is_named_deepseek_llm(tmp_path, tiny_data):
    """DeepSeek-LLM's pre_tokenizer, exactly as its tokenizer.json holds it, is llama.cpp's "deepseek-llm";
    a run with such a tokenizer exports and answers like the studio. transformers' GGUF loader does not
    know "deepseek-llm" (it splits with GPT-2's rules) and re-spells DeepSeek's special tokens: the
    parity's reader restores those from the file, and the report says both. A near copy of the
    pre_tokenizer (one letter short) is refused."""
    import gguf
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    rows = json.loads(Path(tiny_data).read_text(encoding="utf-8"))
    texts = [f"User: {r['instruction']}\n\nAssistant: {r['output']}" for r in rows] + [DEEPSEEK_PROBE] * 3
    tok = deepseek_tokenizer(texts)
    tok.save_pretrained(tmp_path / "deepseek")
    saved = json.loads((tmp_path / "deepseek" / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["pre_tokenizer"] == {"type": "Sequence", "pretokenizers": gguf_export.DEEPSEEK_LLM_PRE}
    assert gguf_export._pre_tokenizer(saved) == "deepseek-llm"
    near = json.loads(json.dumps(saved))
    near["pre_tokenizer"]["pretokenizers"][1]["pattern"]["Regex"] = \
        saved["pre_tokenizer"]["pretokenizers"][1]["pattern"]["Regex"].replace("\u037f", "")
    with pytest.raises(export.ExportError, match="does not recognise"):
        gguf_export._pre_tokenizer(near)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "deepseek")
    run = train_mod.train(tiny_spec(tmp_path / "deepseek", tiny_data, max_steps=2, val_size=0.25),
                          tmp_path / "run").path
    report = gguf_export.export_gguf(run, tmp_path / "ds.gguf", "f16", ollama_dir=tmp_path, prompts=2)
    modelfile = (tmp_path / "Modelfile").read_text(encoding="utf-8")
    assert 'PARAMETER stop "<｜end▁of▁sentence｜>"' in modelfile
    system = RunFolder(run).spec().data.system_prompt
    for conv in CONVERSATIONS:  # the Go TEMPLATE renders DeepSeek's turns, BOS included, as training did
        assert ollama_prompt(modelfile, conv) == template.render(tok, conv, system, add_generation_prompt=True)
    fields = gguf.GGUFReader(tmp_path / "ds.gguf").fields
    assert fields["tokenizer.ggml.pre"].contents() == "deepseek-llm"
    assert report["parity"]["share"] == 1.0, report["parity"]
    assert "does not know 'deepseek-llm'" in report["parity"]["tokenizer"]
    assert "GPT-2's split" in gguf_export.summary(report)

    # transformers' own reading names other BOS/EOS (it re-spells DeepSeek's special tokens); the
    # parity's reader puts them back from the file, and then tokenizes the training texts as training did
    plain = AutoTokenizer.from_pretrained(tmp_path, gguf_file="ds.gguf")
    assert (plain.bos_token_id, plain.eos_token_id) != (tok.bos_token_id, tok.eos_token_id)
    back, note = gguf_export._read_tokenizer(tmp_path / "ds.gguf")
    assert "<｜begin▁of▁sentence｜>" in note and note in report["parity"]["tokenizer"]
    assert (back.bos_token_id, back.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    for text in texts[:4]:
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(DEEPSEEK_PROBE, add_special_tokens=False)["input_ids"]
    assert back.decode(ids) == DEEPSEEK_PROBE
    # ...but splits with GPT-2's rules (digits grouped, "\n\n" kept together, a space joined to CJK), so
    # text beyond the prompts compared may tokenize otherwise than in llama.cpp: what the report says
    split = back.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    assert split("12\n\n 你") != tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12\n\n 你")
    print(f"\ndeepseek probe: {'same' if back(DEEPSEEK_PROBE, add_special_tokens=False)['input_ids'] == ids else 'other'}"
          f" tokens from transformers' reader")


def test_a_qlora_run_exports_merged_into_a_16_bit_base(tmp_path, tiny_model_dir, tiny_data):
    """QLoRA trains on a 4-bit base; the file holds the adapter merged into the unquantised base
    (as the merge export), so its answers may differ from the 4-bit in-app model: the share is reported."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is needed to train a QLoRA run")
    run = train_mod.train(tiny_spec(tiny_model_dir, tiny_data, method="qlora", max_steps=2, val_size=0.25),
                          tmp_path / "run").path
    report = gguf_export.export_gguf(run, tmp_path / "q.gguf", "f16", prompts=2)
    assert report["method"] == "qlora" and report["parity"]["template"] == "identical"
    assert only(tmp_path) == ["q.gguf", "run"]
    print(f"\nqlora f16: {report['parity']['same']} of {report['parity']['prompts']} alike")


# -- Ollama ---------------------------------------------------------------------------------------
def test_modelfile_template_renders_exactly_what_training_rendered(exported, run):
    text = (exported["q8_0"][1] / "ollama" / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ../model.gguf\n")
    assert f'SYSTEM """{SYSTEM}"""' in text and 'PARAMETER stop "<|im_end|>"' in text
    for key, value in gguf_export.SAMPLING.items():
        assert f"PARAMETER {key} {value}\n" in text
    train_tok = export.run_tokenizer(RunFolder(run).spec())
    plain = template.setup_chat_template(models.load_tokenizer(models.resolve_model(RunFolder(run).spec().model.model)))
    for conv in CONVERSATIONS:
        assert ollama_prompt(text, conv) == template.render(plain, conv, SYSTEM, add_generation_prompt=True)
        # a chat ending on the assistant's turn gets no generation prompt, as in training
        assert ollama_prompt(text, conv[:-1]) == template.render(plain, conv[:-1], SYSTEM)
        assert ollama_prompt(text, conv) == train_tok.apply_chat_template(conv, tokenize=False,
                                                                          add_generation_prompt=True)


def test_without_a_system_prompt_the_template_keeps_its_own_default(tokenizer):
    """SmolLM2's template writes its own system message when a chat has none: so does the TEMPLATE."""
    text = "TEMPLATE " + gguf_export._quoted(gguf_export.go_template(tokenizer))
    assert "SmolLM" in text
    for conv in CONVERSATIONS:
        assert ollama_prompt(text, conv) == tokenizer.apply_chat_template(conv, tokenize=False,
                                                                          add_generation_prompt=True)


def test_a_template_that_is_not_per_role_is_refused(tokenizer):
    odd = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    odd.chat_template = ("{% for m in messages %}{{ loop.index }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(export.ExportError, match="cannot be an Ollama TEMPLATE"):
        gguf_export.go_template(odd)


# -- bad input ------------------------------------------------------------------------------------
def test_an_unsupported_architecture_is_named(run, tmp_path, tiny_model_dir):
    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "mistral-base"))
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace(str(tiny_model_dir), str(other)))
    with pytest.raises(export.ExportError, match=r"not mistral \(MistralForCausalLM\)"):
        gguf_export.export_gguf(copy, tmp_path / "out" / "m.gguf")
    assert only(tmp_path / "out") == []


def test_a_run_without_result_and_a_full_disk_leave_no_file(run, tmp_path, monkeypatch):
    unfinished = RunFolder(tmp_path / "unfinished")
    unfinished.write_config(RunSpec())
    unfinished.set_status("running")
    with pytest.raises(RunError, match="no trained result yet"):
        gguf_export.export_gguf(unfinished.path, tmp_path / "out" / "m.gguf")

    free = shutil.disk_usage(tmp_path)._replace(free=1_000_000)
    monkeypatch.setattr(gguf_export.shutil, "disk_usage", lambda path: free)
    with pytest.raises(export.ExportError, match=r"not enough disk space .*needs about \d+ MB, 1 MB are free"):
        gguf_export.export_gguf(run, tmp_path / "out" / "m.gguf")
    assert only(tmp_path / "out") == []


def test_a_template_mismatch_fails_the_export_and_says_so(run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "with_default_system", lambda chat_template, system: chat_template)
    with pytest.raises(export.ExportError, match="does not match training: the file's chat template renders"):
        gguf_export.export_gguf(run, tmp_path / "out" / "m.gguf", ollama_dir=tmp_path / "out")
    assert only(tmp_path / "out") == []


def test_a_wrong_end_token_in_the_file_fails_the_export(run, tmp_path, monkeypatch):
    """A file whose EOS is not training's (here: the BOS id written as EOS) would never stop in
    llama.cpp as the studio's model does: the export fails naming EOS and the end-of-turn tokens."""
    import gguf

    write = gguf.SpecialVocab.add_to_gguf

    def wrong_eos(self, writer, quiet=False):
        self.special_token_ids["eos"] = self.special_token_ids["bos"]
        write(self, writer, quiet)

    monkeypatch.setattr(gguf.SpecialVocab, "add_to_gguf", wrong_eos)
    with pytest.raises(export.ExportError, match="does not match training: EOS differs .* end-of-turn tokens differ"):
        gguf_export.export_gguf(run, tmp_path / "out" / "m.gguf")
    assert only(tmp_path / "out") == []


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_writes_a_q4_0_file_and_prints_the_parity(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gguf_export, "PROMPTS", PROMPTS)
    assert main(["export", "--run", str(run), "--gguf", str(tmp_path / "m.gguf"), "--quant", "q4_0",
                 "--ollama", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["gguf"] == str(tmp_path / "m.gguf") and report["modelfile"] == str(tmp_path / "Modelfile")
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf\n")
    assert "parity:" in err and "tensors" in err and report["checkpoint"] == "result"
    check_file(report, tmp_path, "q4_0", run)
    assert only(tmp_path) == ["Modelfile", "m.gguf"]


@pytest.mark.parametrize("args,fragment", [
    (["--quant", "q8_0", "--zip", "{tmp}/a.zip"], "--quant and --ollama go with --gguf"),
    (["--ollama", "{tmp}", "--merge", "{tmp}/m"], "--quant and --ollama go with --gguf"),
    (["--checkpoint", "result", "--zip", "{tmp}/a.zip"], "--checkpoint goes with --gguf"),
    (["--gguf", "{tmp}/m.gguf", "--quant", "q2_k"], "quant must be one of f16, q8_0, q4_0"),
    (["--gguf", "{tmp}/m.gguf", "--dtype", "float16"], "--dtype goes with --merge or --push"),
])
def test_cli_bad_gguf_export_is_one_error_line(run, tmp_path, capsys, args, fragment):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["export", "--run", str(run), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not list(tmp_path.glob("*.gguf"))


# -- the web app ----------------------------------------------------------------------------------
def test_the_export_gguf_endpoint_writes_into_the_run_folder_and_hands_over_the_files(run, tmp_path, monkeypatch):
    """/export_gguf names the run by id and the type only; the server puts the file and its
    Modelfile in RUN_DIR/gguf/TYPE, answers with the parity (without server paths) and hands both
    files over: gradio_client receives a GGUF that gguf-py reads. Another user gets neither, by
    run id or by the file's path on the server."""
    import time

    import gguf
    import httpx
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from backend.jobs import Queue

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDIO_AUTH", "admin:root pw,alice:alice pw,bob:bob pw")
    monkeypatch.setattr(gguf_export, "PROMPTS", 2)
    queue = Queue(db_path=tmp_path / "jobs.sqlite3", runs_root=tmp_path / "home" / "runs")
    job = queue.submit(RunFolder(run).spec(), owner="alice")
    shutil.copytree(run, job.run_dir, dirs_exist_ok=True)  # the module's trained run, queued and completed
    queue._transition(job.run_id, ("queued",), state="completed", ended_at=time.time())
    demo, url = serve(queue)
    try:
        alice = Client(url, auth=("alice", "alice pw"), verbose=False)
        message, gguf_file, modelfile_file = alice.predict(job.run_id, "q8_0", api_name="/export_gguf")
        assert "answered token for token" in message and "Modelfile" in message and str(tmp_path) not in message
        folder = Path(job.run_dir) / "gguf" / "q8_0"
        name = f"{Path(job.run_dir).name}-q8_0.gguf"
        assert only(folder) == sorted(["Modelfile", name])
        # what the client received: the file itself, byte for byte, and the Modelfile that names it
        assert Path(gguf_file).name == name and Path(gguf_file).read_bytes() == (folder / name).read_bytes()
        reader = gguf.GGUFReader(gguf_file)
        assert reader.fields["general.architecture"].contents() == "llama"
        assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.0.attn_q")} == {"Q8_0"}
        assert Path(modelfile_file).read_text(encoding="utf-8").startswith(f"FROM ./{name}\n")
        with pytest.raises(AppError):
            alice.predict(job.run_id, "q2_k", api_name="/export_gguf")
        assert only(Path(job.run_dir) / "gguf") == ["q8_0"]

        bob = Client(url, auth=("bob", "bob pw"), verbose=False)
        with pytest.raises(AppError, match="of yours"):
            bob.predict(job.run_id, "q8_0", api_name="/export_gguf")
        web = httpx.Client(base_url=url, timeout=30)
        assert web.post("/login", data={"username": "bob", "password": "bob pw"}).status_code == 200
        for path in (folder / name, folder / "Modelfile"):
            response = web.get(f"/gradio_api/file={path}")
            assert response.status_code >= 400 and b"GGUF" not in response.content[:4], (path, response.status_code)
    finally:
        demo.close()


def test_a_download_is_only_a_file_of_the_callers_run(run, tmp_path):
    """``run_download`` serves a file of the run's folder, never one outside it, by path or by link."""
    import gradio as gr

    from ui.common import run_download

    outside = tmp_path / "secret.txt"
    outside.write_text("not the run's")
    link = Path(run) / "link-out.txt"
    link.symlink_to(outside)
    try:
        for path in (outside, link, Path(run) / ".." / outside.name, Path(run) / "adapter"):
            with pytest.raises(gr.Error, match="not a file of this run"):
                run_download(path, run)
    finally:
        link.unlink()
    served = Path(run_download(Path(run) / "config.yaml", run))
    assert served.read_bytes() == (Path(run) / "config.yaml").read_bytes() and served.name == "config.yaml"
    assert served != Path(run_download(Path(run) / "config.yaml", run))  # a fresh folder each time


# -- the embedded model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_run_exports_files_that_answer_like_the_studio(tmp_path):
    """A few LoRA steps of the embedded SmolLM2 on the persona data: the f16 file's greedy answers
    to 8 validation prompts are the in-app tuned model's, token for token; q8_0's share is printed."""
    from backend.presets import build_spec

    data = Path(__file__).parent / "data" / "persona_vega.csv"
    spec = build_spec({"method": "lora", "data": str(data), "max_steps": 3, "per_device_train_batch_size": 4,
                       "val_size": 8, "mix_data": "none",
                       "measure_forgetting": False, "advise_checkpoints": False})
    run = train_mod.train(spec, tmp_path / "vega").path
    reports = {q: gguf_export.export_gguf(run, tmp_path / f"vega-{q}.gguf", q, ollama_dir=tmp_path / q)
               for q in ("f16", "q8_0")}
    for quant, report in reports.items():
        p = report["parity"]
        print(f"\n{quant}: {p['same']} of {p['prompts']} alike, {report['bytes'] / 1e6:.1f} MB "
              f"(estimated {report['estimated_bytes'] / 1e6:.1f}), written in {report['write_seconds']} s, "
              f"{report['seconds']} s with the check; differs: {p['differs']}")
        assert p["prompts"] == 8 and p["template"] == "identical"
    assert reports["f16"]["parity"]["share"] == 1.0, reports["f16"]["parity"]
