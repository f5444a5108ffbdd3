"""backend/augment.py: 3-gram Jaccard, the paraphrase filter (with a scripted generator), new rows
keep the answer and carry their marker, a tiny random model end to end, and the embedded model on
identity_nova.json."""

from pathlib import Path

import pytest

from backend import augment, data, models

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def scripted(samples: dict, calls: list | None = None):
    """A generator that answers each prompt with its scripted samples (and records each call)."""
    def generate(prompts):
        if calls is not None:
            calls.append(list(prompts))
        return [list(samples.get(p, [])) for p in prompts]
    return generate


def chat(user, answer, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_jaccard3_on_known_strings():
    assert augment.jaccard3("abcd", "abcd") == 1.0
    assert augment.jaccard3("abcd", "abce") == pytest.approx(1 / 3)  # {abc, bcd} vs {abc, bce}
    assert augment.jaccard3("abc", "xyz") == 0.0
    assert augment.jaccard3("Hello  World", "hello world") == 1.0  # case and whitespace normalised
    assert augment.jaccard3("ab", "ab") == 1.0 and augment.jaccard3("ab", "abc") == 0.0  # short texts: one gram
    assert augment.jaccard3("", "") == 1.0 and augment.jaccard3("", "abc") == 0.0
    assert augment.jaccard3("What is your name?", "What's your name?") == pytest.approx(12 / 19)


def test_filter_drops_empty_identical_duplicate_garbled_too_similar_and_too_different():
    original = "What is your name?"
    candidates = ["", "  ?! ", "  what IS your   name ", "What's your name?", "what's your NAME!",
                  "What is your name??", "Tell me a joke about cats.", "So what is your name, my friend?",
                  "Who are you?", "What is your name name name name?", "What is your nam\ufffd?"]
    kept, dropped = augment.filter_paraphrases(original, candidates, taken={"Who are you?"})
    assert kept == ["What's your name?", "So what is your name, my friend?"]
    reasons = {d["text"]: d["reason"].split(" (")[0] for d in dropped}
    assert reasons == {"": "empty", "  ?! ": "empty", "  what IS your   name ": "identical",
                       "what's your NAME!": "duplicate", "What is your name??": "identical",
                       "Tell me a joke about cats.": "too different", "Who are you?": "duplicate",
                       "What is your name name name name?": "garbled", "What is your nam\ufffd?": "garbled"}
    for text in kept:
        assert augment.LOW <= augment.jaccard3(text, original) <= augment.HIGH
    long = "Please write a short poem about the sea and the moon at night."
    kept, dropped = augment.filter_paraphrases(long, ["Please write a short poem about the sea and moon at night.",
                                                      "Please write one short poem about the sea and the moon at night."])
    assert dropped[0]["reason"] == "too similar (similarity 0.95 > 0.9)"
    assert kept == ["Please write one short poem about the sea and the moon at night."]  # 0.885
    # the bounds are parameters
    assert augment.filter_paraphrases(original, ["What's your name?"], low=0.7)[0] == []


def test_garbled_means_looping_where_the_original_does_not():
    assert augment.garbled("你好啊！！你好啊！！你好啊！！")
    assert augment.garbled("Who are you????")
    assert not augment.garbled("Who are you????", "Hey!!!! Who are you?")  # the original has the run too
    assert not augment.garbled("What is 1000 + 1?") and not augment.garbled("你好，你会说中文么？")


def test_clean_and_language_of_the_instruction():
    assert augment.clean('Here is the rewritten question: "Your name?"\nmore text') == "Your name?"
    assert augment.clean("\n\n  “What's your name?”  ") == "What's your name?"
    assert augment.clean("改写后的问题：你叫什么？") == "你叫什么？"
    assert augment.clean("") == ""
    zh, en = augment.instruction_messages("你是谁？"), augment.instruction_messages("Who are you?")
    assert zh[-1]["content"] == augment.INSTRUCTIONS["zh"] + "\n\n你是谁？"
    assert en[-1]["content"] == augment.INSTRUCTIONS["en"] + "\n\nWho are you?"
    assert [m["role"] for m in en] == ["user", "assistant"] * len(augment.EXAMPLES["en"]) + ["user"]


def test_new_rows_keep_the_answer_and_carry_their_marker():
    convs = [chat("What is your name?", "I am Nova.", system="Be nice."),
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Who made you?"}, {"role": "assistant", "content": "Acme Labs."}],
             [{"role": "assistant", "content": "raw text, no prompt"}],
             {"messages": chat("你叫什么名字？", "我叫 Nova。"), "source": "identity"},
             chat("Who built you?", "Acme Labs.")]
    before = [repr(c) for c in convs]
    calls, done = [], []
    samples = {"What is your name?": ["What's your name?", "What's your name?", ""],
               "Who made you?": ["Who was it that made you?", "Who built you?"],  # the second: row 4's prompt
               "你叫什么名字？": ["你叫什么名字呀？", "你的名字叫什么？"],  # the second: too different
               "Who built you?": ["Who was it that made you?", "Who has built you?"]}  # the first: row 1 took it
    rows = augment.paraphrase_prompts(None, None, convs, k=3, batch_size=2, generate=scripted(samples, calls),
                                      progress=lambda d, n: done.append((d, n)))
    assert calls == [["What is your name?", "Who made you?"], ["你叫什么名字？", "Who built you?"]]  # row 2 skipped
    assert done == [(2, 4), (4, 4)]
    assert [repr(c) for c in convs] == before  # the originals are not touched
    assert [(r["augmented_from"], r["messages"][-2]["content"]) for r in rows] == [
        (0, "What's your name?"), (1, "Who was it that made you?"), (3, "你叫什么名字呀？"), (4, "Who has built you?")]
    for r in rows:
        original = augment._messages(convs[r["augmented_from"]])
        assert r["messages"][-1] == original[-1]  # the answer is unchanged
        assert r["messages"][:-2] == original[:-2]  # system prompt and history too
    assert rows[2]["source"] == "identity"  # a dict row keeps its other keys
    assert augment.stats(rows, convs) == {"originals": 5, "augmented": 4, "rows_with_paraphrases": 4}


def test_preview_shows_kept_and_dropped_for_the_first_rows():
    convs = [chat("What is your name?", "Nova."), chat("Who made you?", "Acme."), chat("Where are you?", "Here.")]
    samples = {"What is your name?": ["What's your name?", "Tell me a joke about cats."],
               "Who made you?": ["Who made you?"]}
    shown = augment.preview(None, None, convs, limit=2, generate=scripted(samples))
    assert [(s["index"], s["original"], s["kept"]) for s in shown] == [
        (0, "What is your name?", ["What's your name?"]), (1, "Who made you?", [])]
    assert shown[0]["dropped"][0]["reason"].startswith("too different")
    assert shown[1]["dropped"] == [{"text": "Who made you?", "reason": "identical"}]


def test_tiny_random_model_end_to_end(tiny_model_dir, tiny_data):
    model, _ = models.load_base(str(tiny_model_dir), "lora")
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    convs = data.prepare(str(tiny_data), val_size=0).train[:4]
    settings = dict(k=2, batch_size=2, max_new_tokens=8)
    # Bounds wide open, so that a random model's samples pass: the preview shows what training gets.
    shown = augment.preview(model.eval(), tokenizer, convs, limit=2, low=0.0, high=1.0, **settings)
    assert [s["index"] for s in shown] == [0, 1]
    assert all(len(s["kept"]) + len(s["dropped"]) == 2 for s in shown)  # k samples per prompt, each judged
    assert any(s["kept"] for s in shown)
    wide = augment.paraphrase_prompts(model, tokenizer, convs, low=0.0, high=1.0, **settings)
    assert [(r["augmented_from"], r["messages"][0]["content"]) for r in wide if r["augmented_from"] < 2] == [
        (s["index"], text) for s in shown for text in s["kept"]]
    rows = augment.paraphrase_prompts(model, tokenizer, convs, **settings)
    for r in rows:  # a random model rarely passes the filter; whatever does must obey it
        original = convs[r["augmented_from"]]
        new = r["messages"][0]["content"]
        assert augment.LOW <= augment.jaccard3(new, original[0]["content"]) <= augment.HIGH
        assert augment.normalise(new) != augment.normalise(original[0]["content"])
        assert not augment.garbled(new, original[0]["content"])
        assert r["messages"][1] == original[1]


@pytest.mark.slow
def test_embedded_model_paraphrases_identity_questions():
    if not (SHARED_DATA / "identity_nova.json").exists():
        pytest.skip(f"{SHARED_DATA / 'identity_nova.json'} is absent (the shared demo data sits beside the repo)")
    convs = data.prepare(str(SHARED_DATA / "identity_nova.json"), val_size=0).train[2:7]  # after "hi", "hello"
    model, tokenizer = augment.load_paraphraser()
    raw, sample = {}, augment.sampler(model, tokenizer, k=3, seed=0)

    def generate(prompts):  # the real sampler, its samples kept for printing
        out = sample(prompts)
        raw.update(zip(prompts, out))
        return out

    rows = augment.paraphrase_prompts(model, tokenizer, convs, k=3, generate=generate)
    for i, conv in enumerate(convs):
        prompt = conv[-2]["content"]
        kept = [r["messages"][-2]["content"] for r in rows if r["augmented_from"] == i]
        print(f"{prompt!r}: samples {raw[prompt]} -> kept {kept}")
    assert rows, "no paraphrase of 5 identity questions survived the filter"
    assert all(r["messages"][-1] == convs[r["augmented_from"]][-1] for r in rows)


def test_a_run_with_augment_k_trains_on_marked_paraphrases(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    from conftest import tiny_spec

    from backend import train as train_mod
    from backend.runs import RunFolder

    asked = []

    def fake_sampler(model, tokenizer, k=3, seed=0, *a, **kw):  # the paraphraser, scripted
        asked.append((model, k, seed))
        return lambda prompts: [[f"Please, {p}", p] for p in prompts]

    monkeypatch.setattr(augment, "load_paraphraser", lambda model=None, trust=False: ("the paraphraser", None))
    monkeypatch.setattr(augment, "sampler", fake_sampler)
    spec = tiny_spec(tiny_model_dir, tiny_data, augment_k=2, max_steps=2)
    run = train_mod.train(spec, tmp_path / "run")
    assert asked == [("the paraphraser", 2, spec.train.seed)]
    train, val = data.load_split(run.data_dir, rows=True)
    originals = [r for r in train if "augmented_from" not in r]
    added = [r for r in train if "augmented_from" in r]
    assert len(originals) == 22 and len(added) == 22 and not any("augmented_from" in r for r in val)
    for r in added:  # each original's prompt paraphrased (the identical sample dropped), its answer kept
        source = originals[r["augmented_from"]]["messages"]
        assert r["messages"][-2]["content"] == f"Please, {source[-2]['content']}"
        assert r["messages"][-1] == source[-1]
    status = RunFolder(run.path).status()
    assert status["state"] == "completed" and status["train_rows"] == 44
    assert any(n.startswith("augmentation: 22 paraphrased rows") for n in status["notices"])
    assert data.load_split(run.data_dir)[0][22] == added[0]["messages"]  # plain reading: conversations
