"""backend/models.py: resolving --model, hub errors, the embedded model, method precision."""

import pytest
import torch
from conftest import _Marker

from backend import models, template


def test_local_folder_and_hub_id_resolve(tmp_path, tiny_model_dir):
    assert models.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert models.resolve_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(models.ModelError, match="no config.json"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(models.ModelError, match="neither a local folder"):
        models.resolve_model("not a model")


def test_gated_model_error_names_the_licence_and_token():
    err = models.explain_load_error("meta-llama/Llama-3.1-8B-Instruct", OSError("401 Client Error: gated repo"))
    assert "accept its licence" in str(err) and "HF_TOKEN" in str(err)
    assert "meta-llama/Llama-3.1-8B-Instruct" in str(err)


def test_token_comes_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "token" not in models.hub_kwargs()
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert models.hub_kwargs() == {"trust_remote_code": False, "token": "hf_secret"}


def test_every_method_computes_in_fp32_on_cpu_and_says_so():
    for method in ("qlora", "lora", "full"):
        p = models.precision_for(method, "cpu")
        assert p.compute_dtype == torch.float32 and p.mixed is None
    assert "fp32" in models.precision_for("lora", "cpu").notice
    assert models.precision_for("full", "cpu").notice is None


def test_qlora_on_cpu_lets_go_of_the_memory_mapped_checkpoint(tiny_model_dir, tmp_path):
    """Unquantised parameters left as views into the mapped file would keep every page of it resident."""
    import gc
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path / "own")  # no other test's model maps this copy
    checkpoint = str(folder / "model.safetensors")
    model, precision = models.load_base(str(folder), "qlora")
    gc.collect()
    assert precision.device == "cpu"
    assert checkpoint not in open("/proc/self/maps").read()
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()  # still a working model


@pytest.mark.slow
def test_embedded_model_converts_once_and_answers_paris(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    folder = models.embedded_model_dir()
    assert folder.parent.parent == tmp_path and (folder / "model.safetensors").exists()
    assert models.embedded_model_dir() == folder  # reused, not converted again
    tok = models.load_tokenizer(str(folder))
    model, _ = models.load_base(str(folder), "lora")
    ids = torch.tensor([template.prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}],
                                            "You are a helpful assistant.")])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_each_process_loads_onto_its_own_gpu():
    """Under ``accelerate launch`` (LOCAL_RANK set) a QLoRA replica goes onto that process's GPU, not GPU 0."""
    assert models.device_map_for("cuda", None) == {"": 0}  # one process
    assert models.device_map_for("cuda", "") == {"": 0}
    assert models.device_map_for("cuda", "0") == {"": 0}
    assert models.device_map_for("cuda", "3") == {"": 3}
    assert models.device_map_for("cuda", 1) == {"": 1}
    assert models.device_map_for("cpu", "1") == {"": "cpu"}  # gloo processes on the CPU
    for bad in ("x", "-1"):
        with pytest.raises(models.ModelError, match="LOCAL_RANK"):
            models.device_map_for("cuda", bad)


def test_load_base_passes_local_rank_to_from_pretrained(monkeypatch):
    """load_base reads LOCAL_RANK: the 4-bit model's device_map and the other methods' .to() name GPU 1."""
    import transformers

    calls = {}

    class Fake:
        def to(self, where):
            calls["to"] = where
            return self

    def from_pretrained(path, **kwargs):
        calls["kwargs"] = kwargs
        return Fake()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(models, "precision_for", lambda method: models.Precision("cuda", torch.float16, torch.float16))
    monkeypatch.setattr(transformers, "BitsAndBytesConfig", lambda **kw: kw)
    monkeypatch.setenv("LOCAL_RANK", "1")
    models.load_base("some/model", "qlora")
    assert calls["kwargs"]["device_map"] == {"": 1} and "to" not in calls
    models.load_base("some/model", "lora")
    assert calls["to"] == 1 and "device_map" not in calls["kwargs"]
    monkeypatch.delenv("LOCAL_RANK")
    models.load_base("some/model", "qlora")
    assert calls["kwargs"]["device_map"] == {"": 0}


# -- model folders that fail to load: one ModelError each, and no pickle ever runs ------------------
def copy_of(model_dir, folder, weights=True):
    import shutil

    shutil.copytree(model_dir, folder, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return folder


def test_pickle_weights_are_refused_and_never_unpickled(tmp_path, tiny_model_dir):
    import pickle

    folder = copy_of(tiny_model_dir, tmp_path / "pickled", weights=False)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(models.ModelError, match=r"pickle \(pytorch_model\.bin\).*safetensors are required"):
        models.resolve_model(str(folder))
    with pytest.raises(models.ModelError, match="no safetensors weights"):  # past resolve_model: still refused
        models.load_base(str(folder), "lora")
    assert not marker.exists()


def test_adapter_saved_as_pickle_is_refused(tmp_path, tiny_model_dir):
    import pickle

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    marker = tmp_path / "unpickled"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    base, _ = models.load_base(str(tiny_model_dir), "lora")
    with pytest.raises(models.ModelError, match=r"adapter weights only as a pickle.*safetensors are required"):
        models.load_adapter(base, adapter)
    assert not marker.exists()


def _garbage(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 16 + b"not safetensors")


def _cut(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])


def _resized(folder):
    import json

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, hidden_size=128, intermediate_size=256)))


def _no_weights(folder):
    (folder / "model.safetensors").unlink()


def _config_list(folder):
    (folder / "config.json").write_text("[1, 2]")


def _bad_index(folder):  # sharded weights whose index names a missing shard
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "missing.safetensors"}}')


@pytest.mark.parametrize("damage,message", [
    (_garbage, "SafetensorError"), (_cut, "SafetensorError"), (_resized, "do not fit its config.json"),
    (_no_weights, "no safetensors weights"), (_config_list, "could not load"), (_bad_index, "could not load"),
])
def test_a_broken_model_folder_is_one_model_error(tmp_path, tiny_model_dir, damage, message):
    folder = copy_of(tiny_model_dir, tmp_path / "broken")
    damage(folder)
    with pytest.raises(models.ModelError, match=message):
        models.load_base(models.resolve_model(str(folder)), "lora")


def test_an_adapter_of_another_base_is_one_model_error(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    other = copy_of(tiny_model_dir, tmp_path / "other")
    _resized(other)
    from transformers import AutoConfig, AutoModelForCausalLM

    wide = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other))
    get_peft_model(wide, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    base, _ = models.load_base(str(tiny_model_dir), "lora")
    with pytest.raises(models.ModelError, match="could not load .*adapter"):
        models.load_adapter(base, tmp_path / "adapter")


def test_out_of_memory_while_loading_stays_itself(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", oom)
    with pytest.raises(torch.OutOfMemoryError):  # the queue retries it with a smaller batch
        models.load_base(str(tiny_model_dir), "lora")
