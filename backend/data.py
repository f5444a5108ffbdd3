"""Read a dataset, detect its shape, normalise it to chat messages, split it, summarise it.

    records = load_records("train.csv")            # list of dicts (+ .notes)
    convs = normalise(records, source_name="train.csv")  # [[{"role", "content"}, ...], ...]
    train, val = split(convs)

or all at once: ``prepare(path, tokenizer=tok)`` -> ``Prepared(train, val, summary)``; the
summary is what ``python -m backend prepare --json`` prints.

Files: .json, .jsonl, .csv, .tsv, .parquet, .txt; ``hub:ORG/NAME[:SPLIT]``; a folder written by
``save_to_disk``. Shapes: alpaca, prompt_completion, messages, sharegpt, text (see ``SHAPES``).
Every problem is one ``DataError`` naming the file, the row or line (1-based) and what was expected.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import template

log = logging.getLogger(__name__)

SHAPES = {
    "alpaca": "instruction, output (optional input, system, history [[q, a], ...])",
    "prompt_completion": "prompt + completion|response|answer|output, question + answer, "
                         "or query + response",
    "messages": "messages: [{role, content}]",
    "sharegpt": "conversations: [{from: human|gpt|system, value}]",
    "text": "text",
    "preference": "prompt + chosen + rejected (text or message lists; without prompt, chosen and rejected "
                  "message lists sharing their turns before the answer), or the studio's votes.jsonl",
}
FORMATS = tuple(SHAPES)
PAIRS = [("prompt", "completion"), ("prompt", "response"), ("prompt", "answer"),
         ("prompt", "output"), ("question", "answer"), ("query", "response")]
FIELDS = {"instruction", "input", "output", "system", "history", "prompt", "completion", "response",
          "answer", "question", "query", "messages", "conversations", "text", "chosen", "rejected"}
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "model": "assistant", "bot": "assistant"}
SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".txt")
MAX_DEPTH = 64  # lists and objects inside each other in one JSON document; a messages file needs 4


class DataError(ValueError):
    """Bad input data; the message names the file, the row or line, and what was expected."""


class Records(list):
    """A list of row dicts that also carries ``notes`` (e.g. an encoding fallback)."""

    def __init__(self, rows=(), notes=None):
        super().__init__(rows)
        self.notes = list(notes or [])


@dataclass
class Prepared:
    train: list[list[dict]]
    val: list[list[dict]]
    summary: dict = field(default_factory=dict)


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


# ---- reading -------------------------------------------------------------------------------

def load_records(source: str) -> Records:
    """Read ``source`` (a file, a save_to_disk folder, or ``hub:ORG/NAME[:SPLIT]``) into row dicts."""
    source = str(source)
    if source.startswith("hub:"):
        rows = _load_hub(source[4:])
    elif Path(source).is_dir():
        rows = _load_disk(Path(source), None)
    else:
        rows = _load_file(Path(source))
    for note in rows.notes:
        log.warning(note)
    return rows


def _load_hub(ref: str) -> Records:
    # hub:<local save_to_disk folder>[:SPLIT] is accepted too.
    path, split_name = ref, ""
    if ":" in ref and not Path(ref).exists():
        path, _, split_name = ref.rpartition(":")
    if Path(path).is_dir():
        return _load_disk(Path(path), split_name or None)
    if path.count("/") != 1:
        raise DataError(f"hub:{ref}: expected hub:ORG/NAME[:SPLIT] or hub:<local save_to_disk folder>")
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split_name or "train")
    except Exception as exc:  # network, auth, missing split: all become one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"hub:{ref}: could not load the dataset ({first[:200]})") from exc
    return Records(ds.to_list())


def _load_disk(folder: Path, split_name: str | None) -> Records:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(f"{folder}: a folder, but not a dataset saved with save_to_disk "
                        f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from exc
    notes = []
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        chosen = split_name or ("train" if "train" in ds else names[0])
        if chosen not in ds:
            raise DataError(f"{folder}: no split {chosen!r} (splits: {', '.join(names)})")
        if len(names) > 1 and not split_name:
            notes.append(f"{folder.name} has splits {', '.join(names)}; using {chosen!r}")
        ds = ds[chosen]
    return Records(ds.to_list(), notes)


def _load_file(path: Path) -> Records:
    name, suffix = path.name, path.suffix.lower()
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if suffix not in SUFFIXES:
        raise DataError(f"{name}: unsupported file type {suffix or '(none)'!r} "
                        f"(expected {', '.join(SUFFIXES)})")
    raw = path.read_bytes()
    if suffix == ".parquet" and raw:
        return _read_parquet(path)
    text, notes = _decode(raw, name)
    if not text.strip():
        raise DataError(f"{name}: the file is empty")
    if suffix == ".txt":
        blocks = [b.strip() for b in re.split(r"\n[ \t\r]*\n", text)]
        return Records([{"text": b} for b in blocks if b], notes)
    if suffix in (".csv", ".tsv"):
        return Records(_read_csv(text, name, "\t" if suffix == ".tsv" else ","), notes)
    rows, more = _read_json(text, name, lines=suffix != ".json")
    return Records(rows, notes + more)


def _decode(raw: bytes, name: str) -> tuple[str, list[str]]:
    """UTF-8 (BOM or not); else latin-1/cp1252 when that reads as plausible text; else an error."""
    not_text = f"{name}: not a text file in a known encoding (expected UTF-8"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        with contextlib.suppress(UnicodeDecodeError):
            return raw.decode("utf-16"), [f"{name} is UTF-16; decoded it (UTF-8 is preferred)"]
    try:
        text = raw.decode("utf-8-sig")
        if "\x00" in text:  # UTF-16 without a BOM, or binary data that happens to be valid UTF-8
            raise DataError(f"{not_text}; it contains NUL bytes, so it is binary or UTF-16 without a BOM)")
        return text, []
    except UnicodeDecodeError:
        pass
    for encoding in ("latin-1", "cp1252"):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        # Real latin-1/cp1252 text: no control bytes, few non-ASCII letters, never in long runs.
        non_ascii = len(text) - len(text.encode("ascii", "ignore"))
        if (not re.search(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]", text)
                and not re.search(r"[^\x00-\x7f]{4,}", text) and non_ascii <= 0.2 * len(text)):
            return text, [f"{name} was not UTF-8; decoded as {encoding}"]
    raise DataError(f"{not_text}, or latin-1/cp1252 text)")


def _read_parquet(path: Path) -> Records:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:
        raise DataError(f"{path.name}: not a valid Parquet file ({str(exc)[:120]})") from exc
    return Records(rows)


def _read_csv(text: str, name: str, delimiter: str) -> list[dict]:
    old_limit = csv.field_size_limit(1 << 30)  # the default (128 KiB per field) is too small for documents
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = next(reader, None)
        rows = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise DataError(f"{name}, line {reader.line_num}: {len(cells)} fields, "
                                f"but the header has {len(header)} ({', '.join(header)})")
            rows.append(dict(zip(header, cells)))
    except csv.Error as exc:
        raise DataError(f"{name}, line {reader.line_num}: not valid CSV ({exc})") from exc
    finally:
        csv.field_size_limit(old_limit)
    if not rows:
        raise DataError(f"{name}: the file has a header but no rows")
    return rows


def _loads(text: str, where: str):
    """``json.loads``, with nesting deeper than ``MAX_DEPTH`` one DataError. Python's parser recurses:
    about 1000 levels crash it with a RecursionError, and fewer would reach whatever walks the rows."""
    too_deep = DataError(f"{where}: JSON nested too deeply (more than {MAX_DEPTH} levels of lists and objects)")
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    if _too_deep(value):
        raise too_deep
    return value


def _too_deep(value) -> bool:
    """Whether lists and dicts nest more than ``MAX_DEPTH`` levels; a loop, not recursion."""
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return False


def _read_json(text: str, name: str, lines: bool) -> tuple[list[dict], list[str]]:
    """A JSON list (or {"data"/"train": [...]}) or JSON lines; .json holding JSON lines is accepted."""
    if lines and not text.lstrip().startswith("["):
        return _read_json_lines(text, name), []
    try:
        data = _loads(text, name)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":  # "Extra data" after a first object: JSON lines in a .json file
            raise DataError(f"{name}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
        note = f"{name} holds JSON lines, not one JSON document; read it as .jsonl"
        return _read_json_lines(text, name), [note]
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "train") if isinstance(data.get(k), list)), data)
    if not isinstance(data, list):
        raise DataError(f'{name}: expected a list of objects, or {{"data": [...]}}; '
                        f"found {type(data).__name__}")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(f"{name}, row {i}: expected an object, found {type(row).__name__}")
    return data, []


def _read_json_lines(text: str, name: str) -> list[dict]:
    rows = []
    lines = text.splitlines()
    last = max(i for i, line in enumerate(lines, 1) if line.strip())
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = _loads(line, f"{name}, line {i}")
        except json.JSONDecodeError as exc:
            cut = i == last > 1 and line.lstrip().startswith("{") and not line.rstrip().endswith("}")
            raise DataError(f"{name}, line {i}: invalid JSON ({exc.msg}) near {_snippet(line.strip())}"
                            + (" - the file looks cut off" if cut else "")) from None
        if not isinstance(row, dict):
            raise DataError(f"{name}, line {i}: expected a JSON object, found {type(row).__name__}")
        rows.append(row)
    return rows


# ---- shapes --------------------------------------------------------------------------------

def _columns(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in records for k in row))


def detect_format(records: list[dict], source_name: str = "") -> str:
    """The shape of ``records``: alpaca, prompt_completion, messages, sharegpt or text."""
    cols = set(_columns(records))
    if {"chosen", "rejected"} <= cols or {"answers", "winner"} <= cols:
        return "preference"
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if any({a, b} <= cols for a, b in PAIRS):
        return "prompt_completion"
    if "text" in cols:
        return "text"
    shapes = "; ".join(f"{k} ({v})" for k, v in SHAPES.items())
    raise DataError(f"{source_name or 'data'}: unknown format; columns found: "
                    f"{', '.join(map(str, _columns(records))) or '(none)'}; expected one of: {shapes}; "
                    f"or map columns with --map FIELD=COLUMN")


def _format_for_mapping(mapping: dict) -> str | None:
    named = set(mapping)
    for fmt, keys in (("preference", {"chosen", "rejected"}), ("messages", {"messages"}), ("sharegpt", {"conversations"}),
                      ("alpaca", {"instruction", "input", "history"}),
                      ("prompt_completion", {"prompt", "completion", "response", "question", "answer",
                                             "query"}),
                      ("text", {"text"})):
        if named & keys:
            return fmt
    return None


def normalise(records: list[dict], fmt: str = "auto", mapping: dict | None = None,
              source_name: str = "") -> list[list[dict]]:
    """Turn each row into chat messages ``[{"role": system|user|assistant, "content": str}, ...]``.

    ``mapping`` maps canonical fields to the file's columns ({"prompt": "question"}) and, with
    ``fmt="auto"``, picks the format whose fields it names. Fields are stripped at both ends only.
    """
    return _convert(*_resolve(records, fmt, mapping, source_name or "data"), mapping, source_name or "data")


def _resolve(records: list[dict], fmt: str, mapping: dict | None, name: str) -> tuple[list[dict], str]:
    """Apply ``mapping`` (checking every column it names) and settle the format."""
    if not records:
        raise DataError(f"{name}: no rows")
    if mapping:
        cols = _columns(records)
        for key, col in mapping.items():
            if key not in FIELDS:
                raise DataError(f"--map {key}={col}: unknown field {key!r} "
                                f"(fields: {', '.join(sorted(FIELDS))})")
            if col not in cols:
                raise DataError(f"--map {key}={col}: no column {col!r} in {name} "
                                f"(columns: {', '.join(map(str, cols))})")
        records = [{**row, **{k: row.get(c) for k, c in mapping.items()}} for row in records]
        if fmt == "auto":
            fmt = _format_for_mapping(mapping) or "auto"
    if fmt == "auto":
        fmt = detect_format(records, name)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (expected auto or one of: {', '.join(FORMATS)})")
    return records, fmt


def _convert(records: list[dict], fmt: str, mapping: dict | None, name: str) -> list[list[dict]]:
    pair = None
    if fmt == "prompt_completion":
        cols = set(_columns(records))
        pair = next(((a, b) for a, b in PAIRS if {a, b} <= cols), None)
        if mapping:  # the fields the mapping names win over whatever else the file has
            pair = next(((a, b) for a, b in PAIRS if {a, b} <= set(mapping)), None) or pair
        if pair is None:
            raise DataError(f"{name}: prompt_completion needs {SHAPES['prompt_completion']} "
                            f"(columns: {', '.join(map(str, cols))})")
    convert = {"alpaca": _alpaca, "messages": _chat, "sharegpt": _chat, "text": _text_row,
               "preference": _preference, "prompt_completion": lambda row, where: _pair(row, where, pair)}[fmt]
    rows = [convert(row, f"{name}, row {i}") for i, row in enumerate(records, 1)]
    if fmt == "preference":  # votes without a winner (tie, both bad) say nothing about which answer is better
        rows = [r for r in rows if r is not None]
        if not rows:
            raise DataError(f"{name}: no preference pairs (every vote is a tie or 'both bad')")
    return rows


def _field(row: dict, key: str, where: str, need: str | None = None) -> str:
    """``row[key]`` as stripped text; "" if absent and optional (``need`` is None)."""
    value = row.get(key)
    if isinstance(value, float) and math.isnan(value):
        value = None
    if value is None:
        if need:
            raise DataError(f"{where}: missing {key!r} ({need})")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} should be text, found {type(value).__name__}")
    value = value.strip()
    if need and not value:
        raise DataError(f"{where}: {key!r} is empty ({need})")
    return value


def _turn(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _with_system(row: dict, where: str, messages: list[dict]) -> list[dict]:
    system = _field(row, "system", where)
    return ([{"role": "system", "content": system}] if system else []) + messages


def _alpaca(row: dict, where: str) -> list[dict]:
    need = "alpaca rows need instruction and output"
    instruction, output = _field(row, "instruction", where, need), _field(row, "output", where, need)
    extra = _field(row, "input", where)
    history = _json_list(row.get("history") or [], "history", where)
    messages = []
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"{where}: 'history' should be a list of [question, answer] pairs, "
                            f"found {_snippet(str(turn))}")
        messages += _turn(turn[0].strip(), turn[1].strip())
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return _with_system(row, where, messages + _turn(user, output))


def _pair(row: dict, where: str, pair: tuple[str, str]) -> list[dict]:
    need = f"prompt_completion rows need {pair[0]} and {pair[1]}"
    prompt, answer = _field(row, pair[0], where, need), _field(row, pair[1], where, need)
    return _with_system(row, where, _turn(prompt, answer))


def _text_row(row: dict, where: str) -> list[dict]:
    return [{"role": "assistant", "content": _field(row, "text", where, "text rows need a non-empty text")}]


def _json_list(value, key: str, where: str) -> list:
    if isinstance(value, str):  # a list stored as a JSON string, as CSV files do
        try:
            value = _loads(value, f"{where}: {key!r}")
        except json.JSONDecodeError:
            raise DataError(f"{where}: {key!r} should be a list, found text {_snippet(value)}") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {key!r} should be a list, found {type(value).__name__}")
    return list(value)


def _chat(row: dict, where: str) -> list[dict]:
    """A messages (role/content) or sharegpt (from/value) row; either key style is accepted in both."""
    key = "messages" if "messages" in row else "conversations"
    if row.get(key) is None:
        raise DataError(f"{where}: missing {key!r} (expected {SHAPES['messages']} or {SHAPES['sharegpt']})")
    messages = _message_list(row[key], key, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message (nothing to learn from)")
    return messages


def _message_list(value, key: str, where: str) -> list[dict]:
    """``[{role, content}]`` or ``[{from, value}]`` as chat messages."""
    messages = []
    for j, msg in enumerate(_json_list(value, key, where), 1):
        at = f"{where}, {key}[{j}]"
        if not isinstance(msg, dict):
            raise DataError(f"{at}: expected an object with role and content, found {type(msg).__name__}")
        role_raw = msg.get("role", msg.get("from"))
        role = ROLES.get(str(role_raw).lower())
        if role is None:
            raise DataError(f"{at}: unknown role {role_raw!r} (expected system, user/human, assistant/gpt)")
        content = msg.get("content", msg.get("value"))
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        content = _field({"content": content}, "content", at, "every message needs content")
        messages.append({"role": role, "content": content})
    return messages


def _preference(row: dict, where: str) -> dict | None:
    """A preference row as ``{"messages": prompt + [chosen answer], "rejected": answer}``: the
    conversation ending with the chosen answer is what SFT-side tools (eval loss, the advisor,
    batch references) read. A vote without a winner gives None."""
    if "winner" in row and "answers" in row and "chosen" not in row:  # a line of the studio's votes.jsonl
        winner = row["winner"]
        if winner is None:
            return None
        answers = row["answers"] if isinstance(row["answers"], dict) else {}
        if winner not in answers or len(answers) != 2:
            raise DataError(f"{where}: a vote needs answers of both sides and a winner among them")
        loser = next(side for side in answers if side != winner)
        if answers[winner] == answers[loser]:  # a vote between two equal answers prefers nothing
            return None
        row = {"prompt": row.get("prompt"), "system": row.get("system_prompt"),
               "chosen": answers[winner], "rejected": answers[loser]}
    need = "preference rows need prompt, chosen and rejected"
    answers, contexts = {}, {}
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, (list, tuple)) or (isinstance(value, str) and value.lstrip().startswith("[{")):
            messages = _message_list(value, key, where)
            if not messages or messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: {key!r} should end with the assistant's answer")
            answers[key], contexts[key] = messages[-1]["content"], messages[:-1]
        else:
            answers[key], contexts[key] = _field(row, key, where, need), []
    if row.get("prompt") is None:
        if not contexts["chosen"] or contexts["chosen"] != contexts["rejected"]:
            raise DataError(f"{where}: no 'prompt', and chosen and rejected do not share the turns before their "
                            f"answer ({need})")
        prompt = contexts["chosen"]
    elif isinstance(row["prompt"], (list, tuple)):
        prompt = _message_list(row["prompt"], "prompt", where)
    else:
        prompt = contexts["chosen"] + [{"role": "user", "content": _field(row, "prompt", where, need)}]
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt should end with a user turn")
    if answers["chosen"] == answers["rejected"]:
        raise DataError(f"{where}: chosen and rejected are the same answer (nothing to prefer)")
    messages = _with_system(row, where, prompt) if prompt[0]["role"] != "system" else prompt
    return {"messages": messages + [{"role": "assistant", "content": answers["chosen"]}],
            "rejected": answers["rejected"]}


# ---- split, prepare, save ------------------------------------------------------------------

def split(conversations: list, val_size: float | int = 0.1, seed: int = 42) -> tuple[list, list]:
    """A fixed-seed split: ``val_size`` is a fraction (< 1) or a row count.

    With 2+ rows and ``val_size > 0`` both sides get at least one row; one row -> no validation.
    Rows keep their original order on each side.
    """
    n = len(conversations)
    if val_size < 0:
        raise DataError(f"val_size must be >= 0, got {val_size}")
    k = round(n * val_size) if val_size < 1 else int(val_size)
    k = 0 if n < 2 or val_size == 0 else max(1, min(k, n - 1))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:k])
    return ([c for i, c in enumerate(conversations) if i not in val_idx],
            [c for i, c in enumerate(conversations) if i in val_idx])


def encode_all(tokenizer, conversations: list, system_prompt: str | None = None,
               max_length: int | None = None) -> list[dict]:
    """``template.encode`` for each conversation (input_ids, labels, truncated)."""
    return [template.encode(tokenizer, c, system_prompt, max_length) for c in conversations]


# ---- raw text: continued pretraining ------------------------------------------------------------

def is_document(conversation) -> bool:
    """A raw-text row (``text`` format): one assistant message and nothing else."""
    return len(conversation) == 1 and conversation[0]["role"] == "assistant"


def text_blocks(tokenizer, documents: list[str], block_size: int) -> list[dict]:
    """Continued pretraining data, as HF's run_clm makes it: the documents' tokens
    (``template.document_ids``: no chat template) concatenated and cut into blocks of at most
    ``block_size`` tokens. Unlike run_clm:

    * ``position_ids`` restart at 0 where a document starts inside a block, so packed attention
      (``backend.attention``) keeps each document's tokens attending only within that document;
      the first token of a document is context only (label -100): nothing in its document precedes it.
    * Consecutive blocks share one token (the last of one is the first of the next), so the token
      after a cut is still predicted from the one before it: every other token is a target exactly once.
    * The last, partial block is kept (shorter), not dropped.

    Returns ``[{"input_ids", "labels", "position_ids"}, ...]``.
    """
    if block_size < 2:
        raise DataError(f"max_length must be at least 2 tokens for raw text, got {block_size}")
    ids, labels, starts = [], [], set()
    for text in documents:
        doc = template.document_ids(tokenizer, text)
        starts.add(len(ids))
        ids += doc
        labels += [template.IGNORE_INDEX] + doc[1:]
    blocks, start = [], 0
    while ids:
        end = min(start + block_size, len(ids))
        positions, p = [], 0
        for i in range(start, end):
            p = 0 if i == start or i in starts else p + 1
            positions.append(p)
        # the block's first token is context (the collator masks it too); the rest keep their labels
        blocks.append({"input_ids": ids[start:end], "labels": [template.IGNORE_INDEX] + labels[start + 1:end],
                       "position_ids": positions})
        if end == len(ids):
            break
        start = end - 1
    return blocks


def _text_summary(tokenizer, train: list, val: list, max_length: int) -> dict:
    """What a raw-text data set becomes: documents, tokens, blocks; the sample is the first block."""
    docs = [c[0]["content"] for c in train + val]
    lengths = sorted(len(template.document_ids(tokenizer, d)) for d in docs)
    train_blocks = text_blocks(tokenizer, [c[0]["content"] for c in train], max_length)
    val_blocks = text_blocks(tokenizer, [c[0]["content"] for c in val], max_length) if val else []
    last = len(train_blocks[-1]["input_ids"])
    notes = [f"raw text: {len(docs)} documents, {sum(lengths)} tokens, {len(train_blocks)} training + "
             f"{len(val_blocks)} validation blocks of up to {max_length} tokens; no chat template, every token "
             f"learned (a document's first token is context only); the last training block holds {last} tokens "
             f"and is kept"]
    first = train_blocks[0]
    return {"documents": len(docs), "tokens": sum(lengths), "blocks": len(train_blocks) + len(val_blocks),
            "train_blocks": len(train_blocks), "val_blocks": len(val_blocks), "block_length": max_length,
            "last_block_length": last, "truncated": 0, "token_lengths": _stats(lengths),
            "length_histogram": _histogram(lengths), "notes": notes,
            "sample": template.mark_loss(tokenizer, first["input_ids"], first["labels"])}


def _stats(lengths: list[int]) -> dict:
    """min, mean, nearest-rank p50 and p95, max of sorted ``lengths``."""
    def pick(q):
        return lengths[max(0, math.ceil(q * len(lengths)) - 1)]

    return {"min": lengths[0], "mean": round(sum(lengths) / len(lengths), 1),
            "p50": pick(0.5), "p95": pick(0.95), "max": lengths[-1]}


def _plain(messages: list[dict], system_prompt: str | None, limit: int = 2000) -> str:
    """The sample without a tokenizer: one ``role: content`` line per message, answers in [[ ]]
    (a raw-text document: its text, all learned)."""
    if is_document(messages):
        return f"[[{messages[0]['content'][:limit]}]]"
    lines = []
    for m in template.with_system(messages, system_prompt):
        text = m["content"][:limit] + ("..." if len(m["content"]) > limit else "")
        lines.append(f"{m['role']}: [[{text}]]" if m["role"] == "assistant" else f"{m['role']}: {text}")
    return "\n".join(lines)


def prepare(source: str, fmt: str = "auto", mapping: dict | None = None, tokenizer=None,
            max_length: int = 2048, system_prompt: str | None = None, chat_template: str | None = None,
            val_size: float | int = 0.1, seed: int = 42) -> Prepared:
    """Load, normalise and split ``source``; summarise it (token stats and sample need ``tokenizer``)."""
    records = load_records(source)
    name = source if str(source).startswith("hub:") else Path(source).name
    rows, fmt = _resolve(records, fmt, mapping, name)
    conversations = _convert(rows, fmt, mapping, name)
    train, val = split(conversations, val_size, seed)
    notes = list(records.notes)
    summary = {"format": fmt, "rows": len(conversations), "train_rows": len(train),
               "val_rows": len(val), "truncated": None, "token_lengths": None, "sample": "",
               "notes": notes, "columns": _columns(records), "source": str(source)}
    chats = conversations_of(conversations)  # a preference row: the conversation that ends with the chosen answer
    if tokenizer is None:
        summary["sample"] = _plain(chats[0], None if fmt == "text" else system_prompt)
        if fmt == "preference":
            summary["sample_rejected"] = _plain(rejected_conversation(conversations[0]), system_prompt)
        return Prepared(train, val, summary)
    template.setup_chat_template(tokenizer, chat_template)
    if fmt == "text":
        text = _text_summary(tokenizer, train, val, max_length)
        summary.update(text, notes=notes + text["notes"])
        return Prepared(train, val, summary)
    lengths = sorted(len(e["input_ids"]) for e in encode_all(tokenizer, chats, system_prompt))
    truncated = sum(n > max_length for n in lengths)
    summary["token_lengths"] = _stats(lengths)
    summary["truncated"] = truncated
    summary["length_histogram"] = _histogram(lengths)
    if truncated:
        notes.append(f"{truncated} of {len(lengths)} rows are longer than max_length={max_length} tokens; "
                     f"they are truncated, not dropped")
    first = template.encode(tokenizer, chats[0], system_prompt, max_length)
    summary["sample"] = template.mark_loss(tokenizer, first["input_ids"], first["labels"])
    if fmt == "preference":  # the same prompt with the answer to prefer less, as the model sees it
        other = template.encode(tokenizer, rejected_conversation(conversations[0]), system_prompt, max_length)
        summary["sample_rejected"] = template.mark_loss(tokenizer, other["input_ids"], other["labels"])
    return Prepared(train, val, summary)


def _histogram(lengths: list[int], bins: int = 20) -> list[dict]:
    """``[{"tokens": bin start, "rows": count}, ...]`` over sorted ``lengths``, for a bar chart."""
    width = max(1, math.ceil((lengths[-1] - lengths[0] + 1) / bins))
    counts: dict[int, int] = {}
    for n in lengths:
        start = lengths[0] + (n - lengths[0]) // width * width
        counts[start] = counts.get(start, 0) + 1
    return [{"tokens": k, "rows": v} for k, v in sorted(counts.items())]


def save_split(prepared: Prepared, folder) -> Path:
    """Write ``train.jsonl`` and ``val.jsonl`` (one ``{"messages": [...]}`` per line) to ``folder``.

    A row may be a conversation or a dict with ``messages`` and markers (an augmented row's
    ``augmented_from``), which are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in (("train", prepared.train), ("val", prepared.val)):
        with open(folder / f"{part}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(m if isinstance(m, dict) else {"messages": m}, ensure_ascii=False) + "\n"
                         for m in rows)
    return folder


def load_split(folder, rows: bool = False) -> tuple[list, list]:
    """Read back what ``save_split`` wrote: ``(train, val)`` lists of conversations (with ``rows``:
    the dicts as written, markers included)."""
    out = []
    for part in ("train", "val"):
        path = Path(folder) / f"{part}.jsonl"
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        out.append(records if rows else [r["messages"] for r in records])
    return out[0], out[1]


def conversations_of(rows: list) -> list:
    """The conversations of rows that may be dicts with ``messages`` (augmented rows; preference rows:
    the conversation ending with the chosen answer)."""
    return [r["messages"] if isinstance(r, dict) else r for r in rows]


def rejected_conversation(row: dict) -> list[dict]:
    """A preference row's conversation with the rejected answer in place of the chosen one."""
    return row["messages"][:-1] + [{"role": "assistant", "content": row["rejected"]}]


def parse_mapping(items: str | list[str] | None) -> dict:
    """A column mapping from ``FIELD=COLUMN`` items: ``--map`` gives a list, the Data tab one text
    with an item per line or comma. ``{"prompt": "question", ...}``."""
    lines = items.replace(",", "\n").splitlines() if isinstance(items, str) else items or []
    out = {}
    for line in (line.strip() for line in lines):
        if line:
            key, sep, column = line.partition("=")
            if not sep or not key.strip() or not column.strip():
                raise DataError(f"column mapping: expected FIELD=COLUMN, got {line!r}")
            out[key.strip()] = column.strip()
    return out
