"""backend/data.py: every file type and shape, every bad input, the split and the summary."""

import json
import pickle
import random
import time
from pathlib import Path

import pytest

from backend import data, template
from backend.data import DataError

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "data"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

U, A, S = "user", "assistant", "system"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def load(path, **kw):
    return data.normalise(data.load_records(path), source_name=Path(path).name, **kw)


# ---- shapes and file types ---------------------------------------------------------------------

def test_alpaca_json_with_input_system_history_and_unicode():
    records = data.load_records(FIXTURES / "alpaca.json")
    assert data.detect_format(records) == "alpaca"
    convs = data.normalise(records)
    assert convs[0] == msgs((U, "Translate to French\n\nGood morning"), (A, "Bonjour"))
    assert convs[1] == msgs((S, "You are a translator."), (U, "Translate to French: hello"), (A, "Bonjour"),
                            (U, "Thanks"), (A, "De rien"), (U, "And in the evening?"), (A, "Bonsoir"))
    assert convs[2] == msgs((U, "用中文打招呼 👋"), (A, "你好！😀  很高兴见到你。"))


def test_prompt_completion_jsonl_skips_blank_lines():
    records = data.load_records(str(FIXTURES / "prompt_completion.jsonl"))
    assert data.detect_format(records) == "prompt_completion"
    convs = data.normalise(records)
    assert len(convs) == 3 and convs[1] == msgs((U, "Capital of France?"), (A, "Paris"))


@pytest.mark.parametrize("prompt,answer", [("prompt", "response"), ("prompt", "answer"), ("prompt", "output"),
                                           ("question", "answer"), ("query", "response")])
def test_prompt_completion_variants(prompt, answer):
    records = [{prompt: "Q?", answer: "A.", "system": "Sys"}]
    assert data.detect_format(records) == "prompt_completion"
    assert data.normalise(records) == [msgs((S, "Sys"), (U, "Q?"), (A, "A."))]


def test_numbers_are_text_and_fields_are_stripped_at_the_ends_only():
    records = [{"question": "  2 +  2 ?\n", "answer": 4}]
    assert data.normalise(records) == [msgs((U, "2 +  2 ?"), (A, "4"))]


def test_messages_jsonl_keeps_all_turns():
    records = data.load_records(str(FIXTURES / "messages.jsonl"))
    assert data.detect_format(records) == "messages"
    convs = data.normalise(records)
    assert convs[0] == msgs((S, "Be brief."), (U, "Hi"), (A, "Hello."), (U, "Name?"), (A, "Nova."))


def test_sharegpt_json_under_data_key_with_from_value_and_role_content():
    records = data.load_records(str(FIXTURES / "sharegpt.json"))
    assert data.detect_format(records) == "sharegpt"
    convs = data.normalise(records)
    assert convs[0] == msgs((S, "Be kind."), (U, "Hello"), (A, "Hi there!"))
    assert convs[1] == msgs((U, "Q1"), (A, "A1"), (U, "Q2"), (A, "A2"))


def test_csv_with_quotes_and_multiline_fields():
    convs = load(str(FIXTURES / "qa.csv"))
    assert convs == [msgs((U, "What is 1+1?"), (A, "2")), msgs((U, "Quote, with comma"), (A, "Multi\nline answer"))]


def test_csv_messages_column_stored_as_json_text(tmp_path):
    cell = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]).replace('"', '""')
    path = write(tmp_path, "m.csv", f'messages\n"{cell}"\n')
    assert load(path) == [msgs((U, "hi"), (A, "yo"))]


def test_txt_blocks_become_raw_text_documents():
    records = data.load_records(str(FIXTURES / "docs.txt"))
    assert [r["text"] for r in records] == ["First document,\nstill the first.", "Second document.",
                                             "Third  document with  spaces."]
    assert data.detect_format(records) == "text"
    assert data.normalise(records)[1] == msgs((A, "Second document."))


def test_text_column():
    assert data.normalise([{"text": "a document", "meta": 1}]) == [msgs((A, "a document"))]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    rows = [{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "👋 hi"}]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load(str(path)) == [msgs((U, "你好"), (A, "👋 hi"))]


def test_json_holding_json_lines_is_read_with_a_note(tmp_path):
    path = write(tmp_path, "x.json", '{"text": "one"}\n{"text": "two"}\n')
    records = data.load_records(path)
    assert [r["text"] for r in records] == ["one", "two"]
    assert "JSON lines" in records.notes[0]


def test_jsonl_holding_a_json_list(tmp_path):
    path = write(tmp_path, "x.jsonl", '[\n {"text": "one"},\n {"text": "two"}\n]\n')
    assert len(data.load_records(path)) == 2


def test_utf8_bom_is_accepted(tmp_path):
    path = write(tmp_path, "bom.csv", "\ufeffprompt,completion\nhi,there\n".encode("utf-8"))
    assert load(path) == [msgs((U, "hi"), (A, "there"))]


# ---- mapping -----------------------------------------------------------------------------------

def test_mapping_overrides_detection(tmp_path):
    # The file has a text column (would be detected as raw text); the mapping says it is Q/A.
    path = write(tmp_path, "data.csv", "q,a,text\nWho?,Nova,ignored\n")
    records = data.load_records(path)
    assert data.detect_format(records) == "text"
    convs = data.normalise(records, mapping={"instruction": "q", "output": "a"})
    assert convs == [msgs((U, "Who?"), (A, "Nova"))]
    convs = data.normalise(records, mapping={"prompt": "q", "completion": "a"})
    assert convs == [msgs((U, "Who?"), (A, "Nova"))]


def test_mapping_with_explicit_format():
    records = [{"ask": "x", "reply": "y"}]
    convs = data.normalise(records, fmt="prompt_completion", mapping={"question": "ask", "answer": "reply"})
    assert convs == [msgs((U, "x"), (A, "y"))]


def test_mapping_naming_a_missing_column(tmp_path):
    path = write(tmp_path, "data.csv", "q,a\nx,y\n")
    with pytest.raises(DataError) as err:
        load(path, mapping={"answer": "reply"})
    assert str(err.value) == "--map answer=reply: no column 'reply' in data.csv (columns: q, a)"


def test_mapping_naming_an_unknown_field():
    with pytest.raises(DataError, match="unknown field 'reply'"):
        data.normalise([{"q": "x"}], mapping={"reply": "q"})


# ---- datasets folders ---------------------------------------------------------------------------

def test_save_to_disk_folder_via_path_and_hub_prefix(tmp_path):
    import datasets

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for source in (str(tmp_path / "ds"), f"hub:{tmp_path / 'ds'}"):
        records = data.load_records(source)
        assert records == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "dd"))
    records = data.load_records(f"hub:{tmp_path / 'dd'}")
    assert len(records) == 3 and "using 'train'" in records.notes[0]
    assert data.load_records(f"hub:{tmp_path / 'dd'}:test") == rows[3:]
    with pytest.raises(DataError, match="no split 'nope'"):
        data.load_records(f"hub:{tmp_path / 'dd'}:nope")


def test_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        data.load_records(str(tmp_path))


def test_bad_hub_reference():
    with pytest.raises(DataError, match="expected hub:ORG/NAME"):
        data.load_records("hub:not-a-valid-name")


# ---- bad input ----------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load_records(str(tmp_path / "nope.jsonl"))


def test_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        data.load_records(write(tmp_path, "x.xlsx", b"PK\x03\x04"))


@pytest.mark.parametrize("name", ["empty.json", "empty.jsonl", "empty.csv", "empty.txt", "empty.parquet"])
def test_empty_file(tmp_path, name):
    with pytest.raises(DataError, match=f"^{name}: the file is empty$"):
        data.load_records(write(tmp_path, name, "\n  \n" if name != "empty.parquet" else b""))


def test_header_only_csv(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_records(write(tmp_path, "train.csv", "prompt,completion\n"))
    assert str(err.value) == "train.csv: the file has a header but no rows"


def test_csv_row_with_too_many_fields(tmp_path):
    with pytest.raises(DataError, match=r"^t\.csv, line 3: 3 fields, but the header has 2"):
        data.load_records(write(tmp_path, "t.csv", "q,a\nx,y\nx,y,z\n"))


def test_truncated_jsonl_names_the_line(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c, cut off mid-obj')
    with pytest.raises(DataError, match=r"^data\.jsonl, line 3: invalid JSON \(Unterminated string.*cut off"):
        data.load_records(path)


def test_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path, "data.json", '[\n {"text": "a"},\n {"text": "b" "c"}\n]')
    with pytest.raises(DataError, match=r"^data\.json, line 3: invalid JSON \(Expecting ',' delimiter\)"):
        data.load_records(path)


def test_json_that_is_not_a_list_of_objects(tmp_path):
    with pytest.raises(DataError, match=r"x\.json, row 2: expected an object, found int"):
        data.load_records(write(tmp_path, "x.json", '[{"text": "a"}, 3]'))
    with pytest.raises(DataError, match=r"x\.jsonl, line 1: expected a JSON object, found str"):
        data.load_records(write(tmp_path, "x.jsonl", '"just a string"\n'))


def test_random_bytes_named_json(tmp_path):
    path = write(tmp_path, "x.json", random.Random(0).randbytes(4096))
    with pytest.raises(DataError, match=r"^x\.json: not a text file in a known encoding"):
        data.load_records(path)


def test_pickle_named_jsonl(tmp_path):
    path = write(tmp_path, "x.jsonl", pickle.dumps([{"text": "hello"}] * 5))
    with pytest.raises(DataError, match=r"^x\.jsonl: not a text file in a known encoding"):
        data.load_records(path)


def nested(depth: int) -> str:
    """A row whose "extra" value is lists inside each other: ``depth`` levels counting the row
    (data.MAX_DEPTH is 64)."""
    return '{"text": "hi", "extra": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


@pytest.mark.parametrize("levels", [65, 900, 100_000])  # 100000: RecursionError before
@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_json_nested_too_deeply_is_one_data_error(tmp_path, name, levels):
    row = nested(levels - 1) if name == "deep.json" else nested(levels)  # .json: the list around it
    path = write(tmp_path, name, f"[{row}]" if name == "deep.json" else f'{{"text": "ok"}}\n{row}\n')
    where = r"deep\.json" if name == "deep.json" else r"deep\.jsonl, line 2"
    with pytest.raises(DataError, match=rf"^{where}: JSON nested too deeply \(more than 64 levels"):
        data.load_records(path)


def test_json_nested_up_to_the_limit_loads(tmp_path):
    assert len(data.load_records(write(tmp_path, "x.json", f"[{nested(63)}]"))) == 1
    assert len(data.load_records(write(tmp_path, "x.jsonl", nested(64)))) == 1


def test_a_deep_json_list_in_a_csv_cell_is_one_data_error(tmp_path):
    path = write(tmp_path, "x.csv", 'messages\n"' + "[" * 5000 + "]" * 5000 + '"\n')
    with pytest.raises(DataError, match=r"^x\.csv, row 1: 'messages': JSON nested too deeply"):
        load(path)


def test_latin1_csv_is_decoded_and_said(tmp_path):
    path = write(tmp_path, "train.csv", 'question,answer\nCafé?,"Oui, très bon"\n'.encode("latin-1"))
    summary = data.prepare(path).summary
    assert summary["notes"] == ["train.csv was not UTF-8; decoded as latin-1"]
    records = data.load_records(path)
    assert data.normalise(records) == [msgs((U, "Café?"), (A, "Oui, très bon"))]


def test_cp1252_curly_quotes(tmp_path):
    path = write(tmp_path, "w.csv", "text\nIt\u2019s \u201cfine\u201d \u2013 really\n".encode("cp1252"))
    records = data.load_records(path)
    assert records[0]["text"] == "It\u2019s \u201cfine\u201d \u2013 really"
    assert records.notes == ["w.csv was not UTF-8; decoded as cp1252"]


@pytest.mark.parametrize("encoding,text", [
    ("utf-16-le", "prompt,completion\nhello,world\n"),  # UTF-16 without a BOM
    ("utf-16-be", "prompt,completion\n你好,世界\n"),
    ("gbk", "prompt,completion\n你好，世界,很高兴见到你\n请介绍一下你自己,我是诺瓦\n"),
    ("shift_jis", "prompt,completion\nこんにちは世界です,私はノバです\n"),
])
def test_file_in_an_unknown_encoding(tmp_path, encoding, text):
    path = write(tmp_path, "x.csv", text.encode(encoding))
    with pytest.raises(DataError, match=r"^x\.csv: not a text file in a known encoding"):
        data.load_records(path)


def test_utf16_with_bom_is_decoded_and_said(tmp_path):
    path = write(tmp_path, "x.csv", "prompt,completion\n你好,👋\n".encode("utf-16"))
    records = data.load_records(path)
    assert records == [{"prompt": "你好", "completion": "👋"}] and "UTF-16" in records.notes[0]


@pytest.mark.parametrize("rows,message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}],
     "x.json, row 2: missing 'output' (alpaca rows need instruction and output)"),
    ([{"instruction": "a", "output": "   "}], "x.json, row 1: 'output' is empty"),
    ([{"instruction": "a", "output": ["b"]}], "x.json, row 1: 'output' should be text, found list"),
    ([{"prompt": "a", "completion": None}], "x.json, row 1: missing 'completion'"),
    ([{"instruction": "a", "output": "b", "history": [["only one"]]}],
     "x.json, row 1: 'history' should be a list of [question, answer] pairs"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "x.json, row 1: no assistant message"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], "x.json, row 1, messages[1]: unknown role 'robot'"),
    ([{"messages": "not json"}], "x.json, row 1: 'messages' should be a list"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}],
     "x.json, row 1, conversations[2]: missing 'content'"),
    ([{"text": ""}], "x.json, row 1: 'text' is empty"),
])
def test_rows_lacking_needed_fields(rows, message):
    with pytest.raises(DataError) as err:
        data.normalise(rows, source_name="x.json")
    assert str(err.value).startswith(message)


def test_unknown_shape_lists_columns_and_shapes():
    with pytest.raises(DataError) as err:
        data.detect_format([{"foo": 1, "bar": 2}], "x.json")
    assert "columns found: foo, bar" in str(err.value)
    for shape in data.FORMATS:
        assert shape in str(err.value)


def test_unknown_format_name():
    with pytest.raises(DataError, match="unknown format 'chatml'"):
        data.normalise([{"text": "x"}], fmt="chatml")


def linear_seconds(path) -> float:
    """Seconds that reading, decoding, splitting and parsing the file's lines take here and now: what any
    loader must do at least. Timed twice, after the load, the slower counted: a machine under load
    slows it as much as the load itself, so limits scaled by it hold there."""

    def once():
        start = time.perf_counter()
        for line in Path(path).read_bytes().decode("utf-8", "replace").splitlines():
            try:
                json.loads(line)
            except ValueError:
                pass
        return time.perf_counter() - start

    return max(once(), once())


def assert_linear_time(seconds, path):
    """A quick load is a few times ``linear_seconds`` (measured: 1-2x); a quadratic one takes minutes."""
    reference = linear_seconds(path)
    assert seconds < 20 * reference + 2, f"{seconds:.1f} s against {reference:.2f} s for one linear pass"


def test_single_50mb_line_of_valid_json_loads_quickly(tmp_path):
    big = "word " * 10_000_000
    path = write(tmp_path, "big.jsonl", json.dumps({"text": big}) + "\n")
    start = time.perf_counter()
    convs = load(path)
    assert_linear_time(time.perf_counter() - start, path)
    assert len(convs) == 1 and convs[0][0]["content"] == big.strip()


@pytest.mark.parametrize("garbage", [b"x" * 50_000_000, b'{"text": "' + b"y" * 50_000_000])
def test_single_50mb_line_of_garbage_gives_a_short_error(tmp_path, garbage):
    path = write(tmp_path, "big.jsonl", garbage)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"^big\.jsonl, line 1: invalid JSON") as err:
        data.load_records(path)
    assert_linear_time(time.perf_counter() - start, path)
    assert len(str(err.value)) < 200


def test_50mb_of_random_bytes_gives_a_short_error(tmp_path):
    path = write(tmp_path, "big.json", random.Random(1).randbytes(50_000_000))
    with pytest.raises(DataError, match="not a text file") as err:
        data.load_records(path)
    assert len(str(err.value)) < 200


# ---- unicode round trip, split, prepare ---------------------------------------------------------

def test_chinese_and_emoji_round_trip_through_save_split(tmp_path):
    text = "你好，世界！🌍🚀 家族: 👨‍👩‍👧‍👦  e\u0301 ＡＢＣ"  # combining accent and full-width letters kept as is
    path = write(tmp_path, "zh.jsonl", "\n".join(json.dumps({"prompt": f"{text} {i}", "completion": text},
                                                           ensure_ascii=False) for i in range(5)))
    prepared = data.prepare(path, val_size=1)
    folder = data.save_split(prepared, tmp_path / "run" / "data")
    raw = (folder / "train.jsonl").read_text(encoding="utf-8")
    assert text in raw  # ensure_ascii=False: readable on disk
    train, val = data.load_split(folder)
    assert (train, val) == (prepared.train, prepared.val)
    assert all(conv[1]["content"] == text for conv in train + val)


def test_split_ten_rows():
    rows = [[{"role": "assistant", "content": str(i)}] for i in range(10)]
    train, val = data.split(rows)
    assert (len(train), len(val)) == (9, 1)
    assert data.split(rows) == (train, val)  # same seed, same split
    assert sorted(train + val, key=lambda c: int(c[0]["content"])) == rows


def test_split_sizes():
    rows = list(range(100))
    assert [len(p) for p in data.split(rows, 0.2)] == [80, 20]
    assert [len(p) for p in data.split(rows, 5)] == [95, 5]
    assert [len(p) for p in data.split(rows, 0)] == [100, 0]
    assert [len(p) for p in data.split([1, 2], 0.1)] == [1, 1]
    assert [len(p) for p in data.split([1, 2], 0.9)] == [1, 1]
    assert data.split([1]) == ([1], [])
    assert data.split(rows, seed=1) != data.split(rows, seed=2)


def test_prepare_without_tokenizer():
    summary = data.prepare(str(FIXTURES / "alpaca.json"), val_size=0).summary
    assert {"format", "rows", "train_rows", "val_rows", "truncated", "token_lengths", "sample", "notes",
            "columns", "source"} <= set(summary)
    assert (summary["format"], summary["rows"], summary["train_rows"], summary["val_rows"]) == ("alpaca", 3, 3, 0)
    assert summary["columns"] == ["instruction", "input", "output", "system", "history"]
    assert summary["sample"] == "user: Translate to French\n\nGood morning\nassistant: [[Bonjour]]"
    assert summary["token_lengths"] is None and summary["truncated"] is None
    json.dumps(summary)


def test_prepare_with_tokenizer_counts_truncation(tokenizer):
    prepared = data.prepare(str(FIXTURES / "messages.jsonl"), tokenizer=tokenizer, max_length=2048,
                            system_prompt="You are Nova.")
    s = prepared.summary
    assert s["truncated"] == 0 and s["format"] == "messages" and s["rows"] == 2
    lengths = s["token_lengths"]
    assert lengths["min"] <= lengths["p50"] <= lengths["p95"] <= lengths["max"]
    assert "[[Hello." in s["sample"] and "[[Nova." in s["sample"]  # both assistant turns are learned
    assert "Be brief." in s["sample"]  # the data's own system message wins over the run's
    short = data.prepare(str(FIXTURES / "messages.jsonl"), tokenizer=tokenizer, max_length=lengths["min"],
                         system_prompt="You are Nova.")
    assert short.summary["truncated"] == 1 and short.summary["rows"] == 2  # counted, not dropped
    assert "1 of 2 rows are longer than max_length" in short.summary["notes"][0]
    json.dumps(short.summary)


def test_encode_all_labels_only_the_answer(tokenizer):
    convs = [msgs((U, "Who are you?"), (A, "I am Nova."))]
    (enc,) = data.encode_all(tokenizer, convs, "Sys", 2048)
    learned = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert "I am Nova." in tokenizer.decode(learned) and "Who are you" not in tokenizer.decode(learned)


def test_real_identity_dataset(tokenizer):
    path = SHARED_DATA / "identity_nova.json"
    if not path.exists():
        pytest.skip(f"the shared identity dataset is not checked out at {path}")
    prepared = data.prepare(str(path), tokenizer=tokenizer, max_length=512)
    s = prepared.summary
    assert (s["format"], s["rows"], s["truncated"]) == ("alpaca", 91, 0)
    assert s["train_rows"] + s["val_rows"] == 91 and s["val_rows"] >= 1
    assert "[[Hello! I am Nova" in s["sample"]  # the first row's answer, marked as learned


# ---- raw text: continued pretraining --------------------------------------------------------------

def test_txt_is_raw_text_without_template_or_system_prompt(tokenizer):
    s = data.prepare(str(FIXTURES / "docs.txt"), tokenizer=tokenizer, max_length=8, val_size=0,
                     system_prompt="You are Nova.").summary
    docs = ["First document,\nstill the first.", "Second document.", "Third  document with  spaces."]
    tokens = sum(len(tokenizer(d)["input_ids"]) + 1 for d in docs)  # + the end-of-document token each
    assert (s["format"], s["documents"], s["tokens"], s["block_length"]) == ("text", 3, tokens, 8)
    assert s["train_blocks"] == s["blocks"] == -(-(tokens - 1) // 7)  # blocks share one token at each cut
    assert "You are Nova" not in s["sample"] and "<|im_start|>" not in s["sample"]
    # the first block as trained: its first token is context, the rest learned
    first = tokenizer.decode(tokenizer(docs[0])["input_ids"][:8])
    assert s["sample"].replace("[[", "").replace("]]", "") == first and s["sample"].startswith("First[[")
    assert any("3 documents" in n and "last training block" in n for n in s["notes"])
    json.dumps(s)


def test_text_blocks_keep_documents_apart_and_learn_every_token_once(tokenizer):
    docs = ["alpha beta gamma " * 7, "delta epsilon", "zeta eta theta iota " * 5]
    ids = [template.document_ids(tokenizer, d) for d in docs]
    stream = [t for doc in ids for t in doc]
    blocks = data.text_blocks(tokenizer, docs, 16)
    assert all(2 <= len(b["input_ids"]) <= 16 for b in blocks)
    # consecutive blocks share one token, nothing else is repeated or lost
    assert [t for i, b in enumerate(blocks) for t in b["input_ids"][1 if i else 0:]] == stream
    targets = [t for b in blocks for t, lab in zip(b["input_ids"], b["labels"]) if lab != template.IGNORE_INDEX]
    assert sorted(targets) == sorted(t for doc in ids for t in doc[1:])  # every token but a document's first
    assert all(b["labels"][0] == template.IGNORE_INDEX for b in blocks)
    # positions restart where a document starts, and there the label is -100
    starts = {sum(map(len, ids[:k])) for k in range(len(ids))}
    offset = 0
    for i, b in enumerate(blocks):
        for j, (p, lab) in enumerate(zip(b["position_ids"], b["labels"])):
            at = offset + j
            assert (p == 0) == (j == 0 or at in starts)
            if at in starts:
                assert lab == template.IGNORE_INDEX
        offset += len(b["input_ids"]) - 1
    assert len(blocks[-1]["input_ids"]) < 16  # the last partial block is kept


def test_text_column_in_jsonl_is_raw_text_and_a_block_size_of_one_is_an_error(tmp_path, tokenizer):
    path = write(tmp_path, "docs.jsonl", '{"text": "one two"}\n{"text": "three"}\n')
    s = data.prepare(path, tokenizer=tokenizer, max_length=64, val_size=0).summary
    assert (s["format"], s["documents"], s["blocks"]) == ("text", 2, 1)
    with pytest.raises(DataError, match="at least 2 tokens"):
        data.prepare(path, tokenizer=tokenizer, max_length=1)
