"""Your own chat data: read a JSONL file of conversations, check every line, report what was left out.

One conversation per line, in one of three formats (the first valid line decides; all lines must use it):

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"text": "### Human: ...### Assistant: ..."}                       (Guanaco text)
    {"message_id": "...", "parent_id": ..., "role": "prompter", ...}   (OASST1 rows: one message per line)

Every problem is reported as `<full path>, line N: what is wrong`, before any model is loaded. By default
bad lines are left out and listed in `ChatData.skipped`; `skip_bad=False` raises on the first one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data, oasst

CHAT_ROLES = ("system", "user", "assistant")
#: The course's example file, written for it (see data/chat_example/CARD.md).
EXAMPLE = "embedded"
_MARKER = re.compile(r"### (Human|Assistant):")


class ChatDataError(ValueError):
    """A bad chat file or line; the message names the file (full path), the line and what is wrong."""

    def __init__(self, path: Path | str, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


@dataclass
class ChatData:
    """The good conversations of a file (lists of {"role", "content"}), their line numbers and what was left out."""

    path: Path
    format: str
    conversations: list[list[dict[str, str]]]
    lines: list[int]
    skipped: list[ChatDataError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.conversations)

    def report(self, root: Path | None = None, limit: int = 20) -> str:
        """A short account: conversations read, and the lines left out with the reason (the first `limit`)."""
        name = _shown(self.path, root)
        turns = [sum(m["role"] == "assistant" for m in c) for c in self.conversations]
        head = (f"{name} ({self.format} format): {len(self)} conversations, "
                f"{sum(turns)} assistant answers, {len(self.skipped)} left out")
        rows = [f"  line {e.line}: {e.problem}" for e in self.skipped[:limit]]
        more = [f"  ... and {len(self.skipped) - limit} more"] if len(self.skipped) > limit else []
        return "\n".join([head, *rows, *more])


def _shown(path: Path, root: Path | None) -> str:
    """The path relative to root when it lies inside (keeps notebook outputs free of machine paths)."""
    try:
        return str(path.relative_to(root)) if root else str(path)
    except ValueError:
        return str(path)


def example_path() -> Path:
    """data/chat_example/chat.jsonl in the checkout: conversations written for the course."""
    from .paths import repo_root

    return repo_root() / "data" / "chat_example" / "chat.jsonl"


# ------------------------------------------------------------------------------------------- checks
def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate one conversation and return it as plain {"role", "content"} dicts; ValueError says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of {{'role', 'content'}} objects, "
                         f"got {type(messages).__name__} {_short(messages)}")
    clean = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ValueError(f"message {number} is a {type(message).__name__}, not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"message {number} has role {role!r}; allowed roles: {list(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {number} ({role}) has content of type {type(content).__name__}; "
                             "content must be a string (text only)")
        if not content.strip():
            raise ValueError(f"message {number} ({role}) has empty content")
        clean.append({"role": role, "content": content.strip()})
    _check_order([m["role"] for m in clean])
    return clean


def _check_order(roles: list[str]) -> None:
    """An optional system message first, then user and assistant alternating, ending with the assistant."""
    if "system" in roles[1:]:
        raise ValueError(f"message {roles.index('system', 1) + 1} is a 'system' message; only the first may be")
    body = roles[1:] if roles[0] == "system" else roles
    if not body:
        raise ValueError("has only a system message; it needs a user message and an assistant answer")
    offset = len(roles) - len(body)
    for i, role in enumerate(body):
        expected = ("user", "assistant")[i % 2]
        if role != expected:
            raise ValueError(f"message {i + offset + 1} is {role!r} where {expected!r} was expected; "
                             "turns go user, assistant, user, assistant, ...")
    if body[-1] != "assistant":
        raise ValueError("ends with a 'user' message; the last message must be the assistant's answer "
                         "(a question without an answer has nothing to learn from)")


def guanaco_to_messages(text: Any) -> list[dict[str, str]]:
    """'### Human: q### Assistant: a...' as messages; text before the first marker becomes a system message."""
    if not isinstance(text, str):
        raise ValueError(f"'text' must be a string, got {type(text).__name__}")
    parts = _MARKER.split(text)
    messages = [{"role": "system", "content": parts[0]}] if parts[0].strip() else []
    if len(parts) == 1:
        raise ValueError("'text' has no '### Human:' or '### Assistant:' marker (Guanaco format)")
    for marker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if marker == "Human" else "assistant", "content": content})
    return check_messages(messages)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------ reading
def _detect(row: Any) -> str:
    """Which format a first row is in."""
    if isinstance(row, dict):
        if "messages" in row:
            return "messages"
        if "message_id" in row:
            return "oasst"
        if "text" in row:
            return "guanaco"
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise ValueError(f"cannot tell the format from {keys}: a line needs 'messages' (chat messages), "
                     "'text' (Guanaco text) or 'message_id' (an OASST1 row)")


def _format_of(path: Path, lines: list[tuple[int, str]]) -> str:
    """The format of the first line that is valid JSON (a file of only broken lines raises the first error)."""
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        try:
            return _detect(row)
        except ValueError as err:
            raise ChatDataError(path, number, str(err)) from None
    _parse(path, *lines[0])  # no line is valid JSON: this raises the first line's error
    raise AssertionError("unreachable")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line; a missing, non-UTF-8 or JSON-array file gives a clear error."""
    if not path.is_file():
        raise ChatDataError(path, None, "no such file (give a .jsonl file with one conversation per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ChatDataError(path, line, f"is not UTF-8 text ({err.reason}); save the file as UTF-8") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ChatDataError(path, None, "is empty; it needs one conversation per line")
    if lines[0][1].lstrip().startswith("["):
        raise ChatDataError(path, lines[0][0], "starts a JSON array; write one JSON object per line (JSONL)")
    return lines


def _parse(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ChatDataError(path, number, f"is not valid JSON ({err.msg} at column {err.colno})") from None


def load_chat(source: str | os.PathLike = EXAMPLE, skip_bad: bool = True) -> ChatData:
    """Read a chat JSONL file ("embedded": the course's example, "hub": OASST1's train split); report bad lines."""
    if str(source) == "hub":
        rows = oasst.load_oasst_messages("hub", "train")
        return _finish(oasst_conversations(oasst.OASST_HUB, list(enumerate(rows, 1))), skip_bad)
    path = example_path() if str(source) == EXAMPLE else Path(source).expanduser().resolve()
    lines = _read_lines(path)
    fmt = _format_of(path, lines)
    if fmt == "oasst":
        result = _load_oasst(path, lines)
    else:
        result = ChatData(path, fmt, [], [])
        for number, line in lines:
            try:
                result.conversations.append(_conversation(path, number, line, fmt))
                result.lines.append(number)
            except ChatDataError as err:
                result.skipped.append(err)
    return _finish(result, skip_bad)


def _finish(result: ChatData, skip_bad: bool) -> ChatData:
    """Raise the first problem (skip_bad=False) or when nothing usable is left; else return the data."""
    path = result.path
    if result.skipped and not skip_bad:
        raise result.skipped[0]
    if not result.conversations:
        why = f"; first: line {result.skipped[0].line}: {result.skipped[0].problem}" if result.skipped else ""
        raise ChatDataError(path, None, f"holds no usable conversation ({len(result.skipped)} left out{why})")
    return result


def _conversation(path: Path, number: int, line: str, fmt: str) -> list[dict[str, str]]:
    """One line in the messages or Guanaco format as checked messages."""
    row = _parse(path, number, line)
    key = "messages" if fmt == "messages" else "text"
    if not isinstance(row, dict) or key not in row:
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ChatDataError(path, number, f"has no {key!r} field (found {found}); the file is in {fmt} "
                                          "format (decided by its first valid line)")
    try:
        return check_messages(row["messages"]) if fmt == "messages" else guanaco_to_messages(row["text"])
    except ValueError as err:
        raise ChatDataError(path, number, str(err)) from None


def _load_oasst(path: Path, lines: list[tuple[int, str]]) -> ChatData:
    """OASST1 rows, one message per line: parse them, then keep each ready tree's best path."""
    numbered, skipped = [], []
    for number, line in lines:
        try:
            row = _parse(path, number, line)
            if not isinstance(row, dict):
                raise ChatDataError(path, number, f"is a {type(row).__name__}, not an OASST1 message object")
            numbered.append((number, row))
        except ChatDataError as err:
            skipped.append(err)
    return oasst_conversations(path, numbered, skipped)


def oasst_conversations(path: Path | str, numbered: list[tuple[int, dict]],
                        skipped: list[ChatDataError] | None = None) -> ChatData:
    """Link (line, OASST1 row) pairs into trees with qlora_lab.data and keep each ready tree's best path."""
    line_of: dict[Any, int] = {}
    for number, row in numbered:
        line_of.setdefault(row.get("message_id"), number)
    trees = oasst.build_trees([row for _, row in numbered], strict=False)
    skipped = list(skipped or [])
    skipped += [ChatDataError(path, line_of.get(err.message_id), str(err)) for err in trees.errors]
    result = ChatData(Path(path), "oasst", [], [], skipped)
    for tree in trees:
        number = line_of[tree.root.id]
        best = oasst.best_path(tree)
        if tree.state != oasst.READY:
            problem = f"tree {tree.tree_id!r} has tree_state {tree.state!r}; only {oasst.READY!r} trees are used"
        elif len(best) < 2:
            problem = f"tree {tree.tree_id!r} has no usable assistant answer"
        else:
            result.conversations.append([{"role": "user" if m["role"] == "prompter" else "assistant",
                                          "content": m["text"].strip()} for m in best])
            result.lines.append(number)
            continue
        skipped.append(ChatDataError(path, number, problem))
    skipped.sort(key=lambda e: e.line or 0)
    return result


# ----------------------------------------------------------------------------------------- bridges
def messages_to_guanaco_text(messages: list[dict[str, str]]) -> str:
    """The Guanaco text of a conversation, exactly as qlora_lab.data writes it (a system message goes first)."""
    messages = check_messages(messages)
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = [{"role": "prompter" if m["role"] == "user" else "assistant", "text": m["content"]}
             for m in messages if m["role"] != "system"]
    return system + data.to_guanaco_text(turns)


def to_oasst_rows(conversations: list[list[dict[str, str]]], lang: str | None = None) -> list[dict[str, Any]]:
    """OASST1 rows (one ready tree per conversation, file order kept) so qlora_lab.train can read the same data."""
    rows = []
    for number, messages in enumerate(conversations):
        messages = check_messages(messages)
        if messages[0]["role"] == "system":
            raise ValueError(f"conversation {number} starts with a system message; OASST1 rows have no system "
                             "role, so qlora_lab.train cannot take it (leave it out or drop the system message)")
        tree = f"conv-{number:05d}"
        parent = None
        for turn, message in enumerate(messages):
            mid = f"{tree}-{turn:02d}"
            rows.append({"message_id": mid, "parent_id": parent, "message_tree_id": tree, "text": message["content"],
                         "role": "prompter" if message["role"] == "user" else "assistant", "lang": lang,
                         "rank": 0 if message["role"] == "assistant" else None, "deleted": False,
                         "review_result": True, "tree_state": oasst.READY})
            parent = mid
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as UTF-8 JSONL (atomically), e.g. OASST1 rows for FinetuneConfig(dataset=path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path
