"""Every defect of a data file gives an error that names the file (full path) and, for text, the line."""

import gzip
import json

import pytest

from qlora_lab import data, oasst

GOOD = [
    {"message_id": "q1", "parent_id": None, "text": "What is NF4?", "role": "prompter", "message_tree_id": "q1",
     "tree_state": "ready_for_export", "rank": None, "deleted": False, "review_result": True},
    {"message_id": "a1", "parent_id": "q1", "text": "A 4-bit data type.", "role": "assistant",
     "message_tree_id": "q1", "tree_state": "ready_for_export", "rank": 0, "deleted": False, "review_result": True},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_good_file_loads(tmp_path):
    rows = data.load_guanaco(write_jsonl(tmp_path / "train.jsonl", GOOD), "train")
    assert rows["text"] == ["### Human: What is NF4?### Assistant: A 4-bit data type."]


@pytest.mark.parametrize("name, broken, where", [
    ("t.jsonl", '{"message_id": "q1"}\n{"message_id": "a1"}\n{"message_id": "x", oops}\n', r"line 3"),
    ("t.json", '[\n{"message_id": "q1"},\n{"message_id": oops}\n]', r"line 3 column \d+"),
])
def test_invalid_json_names_file_and_line(tmp_path, name, broken, where):
    path = tmp_path / name
    path.write_text(broken)
    with pytest.raises(oasst.DataFileError, match=rf"{path}: {where} is not valid JSON"):
        oasst.load_oasst_messages(path)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", GOOD)
    path.write_bytes(path.read_bytes() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(oasst.DataFileError, match=rf"{path}: line 3 is not UTF-8"):
        oasst.load_oasst_messages(path)


def test_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    blob = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD * 50))
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(oasst.DataFileError, match=rf"{path}: the gzip stream is corrupt or truncated"):
        oasst.load_oasst_messages(path)


def test_corrupt_parquet_names_the_file(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(oasst.DataFileError, match=rf"{path}: not a readable parquet file"):
        oasst.load_oasst_messages(path)


@pytest.mark.parametrize("field, value, message", [
    ("rank", "first", r"rank must be a whole number or null, not 'first'"),
    ("rank", 1.5, r"rank must be a whole number"),
    ("message_id", ["a", "b"], r"message_id must be a string, not list"),
    ("parent_id", 7, r"parent_id must be a string, not int"),
    ("deleted", "false", r"deleted must be true, false or null, not str 'false'"),
    ("review_result", "true", r"review_result must be true, false or null"),
])
def test_bad_field_types_name_file_line_and_field(tmp_path, field, value, message):
    rows = [dict(r) for r in GOOD]
    rows[1][field] = value
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(oasst.DataFileError, match=rf"{path}: line 2: {message}"):
        oasst.load_oasst_messages(path)


def test_a_row_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n[1, 2]\n")
    with pytest.raises(oasst.DataFileError, match=rf"{path}: line 2: a row must be a JSON object, not a list"):
        oasst.load_oasst_messages(path)
    listed = tmp_path / "t.json"
    listed.write_text(json.dumps([GOOD[0], "text"]))
    with pytest.raises(oasst.DataFileError, match=rf"{listed}: row 1: a row must be a JSON object, not a str"):
        oasst.load_oasst_messages(listed)


def test_a_file_with_no_usable_rows_is_an_error_that_counts_why(tmp_path):
    rows = [dict(r) for r in GOOD]
    for r in rows:
        r.pop("tree_state")  # no tree_state: not ready for export
    no_state = write_jsonl(tmp_path / "no_state.jsonl", rows)
    with pytest.raises(oasst.DataFileError, match=r"no usable conversation.*tree_state None.*: 1"):
        data.load_guanaco(no_state, "train")
    spam = [dict(r) for r in GOOD]
    spam[1]["review_result"] = False
    with pytest.raises(oasst.DataFileError, match=r"no eligible answer on the best path.*: 1"):
        data.load_guanaco(write_jsonl(tmp_path / "spam.jsonl", spam), "train")
