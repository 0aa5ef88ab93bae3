"""qlora_lab.chat_data: the three input formats, and every bad line named by file, line and problem."""

import json

import pytest

from qlora_lab import chat_data, data, oasst

GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def write(tmp_path, lines, name="chat.jsonl"):
    """Write raw lines (dicts become JSON) and return the file's path."""
    path = tmp_path / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l, ensure_ascii=False) for l in lines) + "\n",
                    encoding="utf-8")
    return path


def msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


BAD_LINES = [  # (line, substring of the problem it must report)
    ('{"messages": [{"role": "user", "content": "a"}', "is not valid JSON"),
    (msgs(("user", "q"), ("bot", "a")), "role 'bot'; allowed roles: ['system', 'user', 'assistant']"),
    (msgs(("user", "q"), ("assistant", "   ")), "message 2 (assistant) has empty content"),
    (msgs(("user", "q"), ("assistant", "a"), ("user", "and?")), "ends with a 'user' message"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": ["a", "b"]}]}, "content of type list"),
    ({"messages": [["user", "q"]]}, "message 1 is a list"),
    (msgs(("user", "q"), ("user", "again"), ("assistant", "a")), "message 2 is 'user' where 'assistant' was expected"),
    (msgs(("user", "q"), ("system", "s"), ("assistant", "a")), "message 2 is a 'system' message; only the first"),
    (msgs(("assistant", "a")), "message 1 is 'assistant' where 'user' was expected"),
    ({"text": "### Human: q### Assistant: a"}, "has no 'messages' field"),
    ("[1, 2]", "has no 'messages' field (found list)"),
]


def test_example_file_loads_clean():
    chat = chat_data.load_chat("embedded")
    assert chat.format == "messages" and not chat.skipped
    assert 35 <= len(chat) <= 60
    korean = [c for c in chat.conversations if any("\uac00" <= ch <= "\ud7a3" for ch in c[0]["content"])]
    assert len(korean) >= 5
    assert any(len(c) > 2 for c in chat.conversations)  # some follow-up questions
    assert (chat_data.example_path().parent / "CARD.md").is_file()


@pytest.mark.parametrize("bad, problem", BAD_LINES, ids=[p[:30] for _, p in BAD_LINES])
def test_bad_line_is_named_by_file_line_and_problem(tmp_path, bad, problem):
    path = write(tmp_path, [GOOD, GOOD, bad, GOOD])
    chat = chat_data.load_chat(path)
    assert len(chat) == 3 and chat.lines == [1, 2, 4]
    [err] = chat.skipped
    assert err.line == 3 and problem in err.problem
    assert str(err).startswith(f"{path.resolve()}, line 3: ")
    with pytest.raises(chat_data.ChatDataError) as raised:
        chat_data.load_chat(path, skip_bad=False)
    assert str(raised.value) == str(err)
    err = raised.value  # no library traceback attached: no cause, and any context suppressed
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_report_lists_every_skipped_line(tmp_path):
    path = write(tmp_path, [GOOD, "not json", msgs(("user", "q")), GOOD])
    report = chat_data.load_chat(path).report(root=tmp_path)
    assert report.splitlines()[0] == "chat.jsonl (messages format): 2 conversations, 2 assistant answers, 2 left out"
    assert "line 2: is not valid JSON" in report and "line 3: ends with a 'user' message" in report
    assert str(tmp_path) not in report


def test_file_level_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(chat_data.ChatDataError, match=r"nope\.jsonl: no such file"):
        chat_data.load_chat(missing)
    with pytest.raises(chat_data.ChatDataError, match=r"empty\.jsonl: is empty"):
        chat_data.load_chat(write(tmp_path, ["", "  "], "empty.jsonl"))
    array = tmp_path / "array.jsonl"
    array.write_text(json.dumps([GOOD, GOOD]))
    with pytest.raises(chat_data.ChatDataError, match=r"array\.jsonl, line 1: starts a JSON array"):
        chat_data.load_chat(array)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(chat_data.ChatDataError, match=r"latin\.jsonl, line 2: is not UTF-8"):
        chat_data.load_chat(latin)
    with pytest.raises(chat_data.ChatDataError, match=r"odd\.jsonl, line 1: cannot tell the format.*'messages'"):
        chat_data.load_chat(write(tmp_path, [{"prompt": "q", "answer": "a"}], "odd.jsonl"))
    with pytest.raises(chat_data.ChatDataError, match=r"allbad\.jsonl: holds no usable conversation \(2 left out; "
                                                      r"first: line 1: ends with a 'user'"):
        chat_data.load_chat(write(tmp_path, [msgs(("user", "q"))] * 2, "allbad.jsonl"))


def test_guanaco_text_rows(tmp_path):
    path = write(tmp_path, [{"text": "### Human: Hi?### Assistant: Hello.### Human: Bye?### Assistant: Bye."},
                            {"text": "Be brief.### Human: q### Assistant: a"},
                            {"text": "### Human: only a question"},
                            {"text": "no markers at all"}])
    chat = chat_data.load_chat(path)
    assert chat.format == "guanaco" and chat.lines == [1, 2]
    assert chat.conversations[0] == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                                     {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye."}]
    assert chat.conversations[1][0] == {"role": "system", "content": "Be brief."}
    assert [(e.line, e.problem.split(";")[0]) for e in chat.skipped] == [
        (3, "ends with a 'user' message"), (4, "'text' has no '### Human:' or '### Assistant:' marker (Guanaco format)")]


def test_oasst_rows_use_qlora_lab_data(tmp_path):
    rows = oasst.load_oasst_messages("embedded", "validation")
    bad = dict(rows[1], role="robot")  # a bad role spoils its whole tree
    path = write(tmp_path, [rows[0], bad, *rows[2:]])
    chat = chat_data.load_chat(path)
    expected = [r["text"] for r in data.guanaco_rows(oasst.build_trees(rows))
                if r["message_tree_id"] != bad["message_tree_id"]]
    assert chat.format == "oasst" and len(expected) > 10
    assert [chat_data.messages_to_guanaco_text(c) for c in chat.conversations] == expected
    assert chat.skipped[0].line == 2 and "role is 'robot'" in chat.skipped[0].problem
    assert any("tree_state 'growing'" in e.problem for e in chat.skipped)  # not ready: left out, as for Guanaco


def test_guanaco_text_and_oasst_rows_round_trip(tmp_path):
    chat = chat_data.load_chat("embedded")
    rows = chat_data.to_oasst_rows(chat.conversations)
    path = chat_data.write_jsonl(rows, tmp_path / "oasst.jsonl")
    guanaco = data.load_guanaco(path, "train")  # exactly what qlora_lab.train reads
    assert guanaco["text"] == [chat_data.messages_to_guanaco_text(c) for c in chat.conversations]
    assert chat_data.load_chat(path).conversations == chat.conversations
    with pytest.raises(ValueError, match="conversation 0 starts with a system message"):
        chat_data.to_oasst_rows([[{"role": "system", "content": "s"}, *GOOD["messages"]]])


def test_report_is_short_for_many_bad_lines(tmp_path):
    path = write(tmp_path, [GOOD] + ["{oops"] * 30)
    report = chat_data.load_chat(path).report(limit=5)
    assert report.count("is not valid JSON") == 5 and report.endswith("... and 25 more")
