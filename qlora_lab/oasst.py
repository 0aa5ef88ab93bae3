"""OASST1 as published: load the message table, link it into trees, check them, take each tree's best path.

OASST1 (OpenAssistant Conversations, the data the QLoRA paper trained Guanaco on) is a forest of message trees
where volunteers ranked sibling replies. This module reads its flat message table (the course's embedded
`data/oasst_mini/`, the hub, or a file in OASST1's exact schema), rebuilds the trees with clear errors for
malformed rows, and picks the highest-ranked path from the prompt down; `qlora_lab.data` turns that path into
Guanaco text.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from . import smoke
from .paths import repo_root

#: Hub ids of the real data (need internet): the message table and the Guanaco text set made from it.
OASST_HUB = "OpenAssistant/oasst1"
GUANACO_HUB = "timdettmers/openassistant-guanaco"
SOURCES = ("embedded", "hub", "guanaco-hub")
SPLITS = ("train", "validation")
#: The 18 columns of OASST1's flat message table, in its order.
OASST_FIELDS = (
    "message_id", "parent_id", "user_id", "created_date", "text", "role", "lang", "review_count",
    "review_result", "deleted", "rank", "synthetic", "model_name", "detoxify", "message_tree_id",
    "tree_state", "emojis", "labels",
)
#: What build_trees needs; a missing parent_id means a root (exports may leave None fields out).
REQUIRED_FIELDS = ("message_id", "text", "role", "message_tree_id")
ROLES = ("prompter", "assistant")
READY = "ready_for_export"
#: Why `build_trees(strict=False)` can skip a tree.
REASONS = ("missing_field", "duplicate_id", "empty_text", "bad_role", "unknown_parent", "root", "cycle",
           "roles_alternate")


class OasstFormatError(ValueError):
    """A malformed OASST row or tree; names the message id and the reason (one of REASONS)."""

    def __init__(self, message_id: Any, reason: str, detail: str):
        self.message_id, self.reason = message_id, reason
        super().__init__(f"message {message_id!r}: {detail} [{reason}]")


class DataNotAvailableError(RuntimeError):
    """The data asked for cannot be read here; the message says what works offline."""


# --------------------------------------------------------------------------------------------- loading
def embedded_dir() -> Path:
    """data/oasst_mini in the checkout: the course-written mini OASST1 used offline."""
    return repo_root() / "data" / "oasst_mini"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")


def _offline_hint(hub_id: str, err: Exception) -> DataNotAvailableError:
    first = str(err).splitlines()[0] if str(err) else ""
    return DataNotAvailableError(
        f"Cannot load {hub_id!r} from the Hugging Face hub: {type(err).__name__}: {first}\n"
        "The hub sources need internet access (or a copy in the datasets cache). Offline, use "
        "source='embedded' (the course's data/oasst_mini) or a path to a .jsonl/.parquet file (or a folder "
        "with train/validation files) in OASST1's schema."
    )


def load_hub(hub_id: str, split: str):
    """datasets.load_dataset with a clear error when the hub cannot be reached."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, split=split)
    except OSError as err:  # ConnectionError, DatasetNotFoundError and offline mode are all OSErrors
        raise _offline_hint(hub_id, err) from err


class DataFileError(ValueError):
    """A data file that cannot be read as message rows; the message names the file (and line) and what is wrong."""


#: Field types a row must have (None allowed where OASST1 has nulls); checked when a file is read.
_ID_FIELDS = ("message_id", "message_tree_id", "parent_id")
_BOOL_FIELDS = ("deleted", "review_result", "synthetic")


def _field_problem(row: Any) -> str | None:
    """Why a row's fields have the wrong type (None if they are fine): ids are strings, rank a whole number."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, not a {type(row).__name__}"
    for name in _ID_FIELDS:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            return f"{name} must be a string, not {type(value).__name__} {value!r:.60}"
    rank = row.get("rank")
    if rank is not None and not (isinstance(rank, float) and math.isnan(rank)):
        whole = isinstance(rank, int) and not isinstance(rank, bool)
        if not whole and not (isinstance(rank, float) and rank.is_integer()):
            return f"rank must be a whole number or null, not {rank!r:.60}"
    for name in _BOOL_FIELDS:
        value = row.get(name)
        if value is not None and not isinstance(value, bool):
            return f"{name} must be true, false or null, not {type(value).__name__} {value!r:.60}"
    return None


def _check_rows(path: Path, rows: list[Any], lines: list[int] | None = None) -> list[dict[str, Any]]:
    """Raise DataFileError naming the file and line (or row index) of the first row with a bad field type."""
    for i, row in enumerate(rows):
        problem = _field_problem(row)
        if problem:
            where = f"line {lines[i]}" if lines else f"row {i}"
            raise DataFileError(f"{path}: {where}: {problem}")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    import gzip
    import zlib

    rows, lines = [], []
    opener = gzip.open if path.name.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as handle:  # bytes, decoded line by line, so a bad byte is found by line
            for number, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFileError(f"{path}: line {number} is not UTF-8 text ({err.reason} at byte "
                                        f"{err.start} of the line); save the file as UTF-8") from err
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataFileError(f"{path}: line {number} is not valid JSON: {err}") from err
                    lines.append(number)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataFileError(f"{path}: the gzip stream is corrupt or truncated after line {number} "
                            f"({type(err).__name__}: {err})") from err
    return _check_rows(path, rows, lines)


def _read_file(path: Path) -> list[dict[str, Any]]:
    """Rows of one .jsonl(.gz), .json (a list) or .parquet file; any defect names the file (and line)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or path.name.lower().endswith(".jsonl.gz"):
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise DataFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}: line {err.lineno} column {err.colno} is not valid JSON: {err.msg}") from err
        if not isinstance(rows, list):
            raise DataFileError(f"{path}: holds a {type(rows).__name__}; expected a list of message rows")
        return _check_rows(path, rows)
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as err:
            raise DataFileError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from err
        return _check_rows(path, rows)
    raise DataFileError(f"Cannot read {path}: the suffix {suffix!r} is not one of "
                        "['.jsonl', '.jsonl.gz', '.json', '.parquet']")


def _read_local(path: Path, split: str) -> list[dict[str, Any]]:
    """A file, or a folder holding <split>.jsonl / <split>.parquet."""
    if path.is_file():
        return _read_file(path)
    for suffix in (".jsonl", ".parquet", ".json"):
        candidate = path / f"{split}{suffix}"
        if candidate.is_file():
            return _read_file(candidate)
    raise DataNotAvailableError(f"No {split}.jsonl or {split}.parquet in {path}")


def load_oasst_messages(source: str | os.PathLike = "embedded", split: str = "train") -> list[dict[str, Any]]:
    """OASST1 message rows (one dict per message, file order kept) from the embedded set, the hub or a path."""
    check_split(split)
    if str(source) == "embedded":
        folder = embedded_dir()
        if not folder.is_dir():
            raise DataNotAvailableError(f"The embedded data folder {folder} is missing; it ships with the checkout.")
        return _read_local(folder, split)
    if str(source) == "hub":
        if smoke.active():  # a smoke run of the gpu profile: the course's own messages stand in
            return load_oasst_messages("embedded", split)
        return load_hub(OASST_HUB, split).to_list()
    if str(source) == "guanaco-hub":
        raise ValueError("source='guanaco-hub' holds finished Guanaco text, not OASST messages; "
                         "use load_guanaco('guanaco-hub') instead")
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"source={str(source)!r} is not one of {list(SOURCES[:2])} and no such file or folder "
                         "exists (a path must be a .jsonl/.json/.parquet file or a folder with <split>.jsonl)")
    return _read_local(path, split)


# ----------------------------------------------------------------------------------------------- trees
@dataclass
class Node:
    """One message and its replies (in file order); `index` is the row's position, used to break ties."""

    message: dict[str, Any]
    index: int
    children: list[Node] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.message["message_id"]

    @property
    def role(self) -> str:
        return self.message["role"]

    @property
    def rank(self) -> int | None:
        """The sibling rank (0 = preferred); None when unranked (NaN from pandas counts as None)."""
        rank = self.message.get("rank")
        if rank is None or (isinstance(rank, float) and math.isnan(rank)):
            return None
        return int(rank)

    def __repr__(self) -> str:
        return f"Node({self.id!r}, {self.role!r}, rank={self.rank}, replies={len(self.children)})"

    @property
    def eligible(self) -> bool:
        """Usable for training: not deleted and not failed in review (review_result False = spam)."""
        return not self.message.get("deleted") and self.message.get("review_result") is not False


@dataclass
class Tree:
    """A conversation tree: its root prompt and, through it, every reply."""

    root: Node

    @property
    def tree_id(self) -> str:
        return self.root.message["message_tree_id"]

    @property
    def state(self) -> str | None:
        return self.root.message.get("tree_state")

    @property
    def lang(self) -> str | None:
        return self.root.message.get("lang")

    def nodes(self) -> Iterator[Node]:
        """Every message, depth first, replies in file order."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def __len__(self) -> int:
        return sum(1 for _ in self.nodes())

    def __repr__(self) -> str:
        return f"Tree({self.tree_id!r}, state={self.state!r}, lang={self.lang!r}, messages={len(self)})"


class TreeList(list):
    """What build_trees returns: the good trees, plus `skipped` (reason -> trees) and the `errors` behind it."""

    def __init__(self, trees: Iterable[Tree], skipped: Counter, errors: list[OasstFormatError]):
        super().__init__(trees)
        self.skipped: Counter = skipped
        self.errors = errors


def _check_row(row: Mapping[str, Any], id_count: Counter) -> None:
    """Field-level checks of one row: fields present, id unique, text non-empty, role known."""
    mid = row.get("message_id")
    missing = [name for name in REQUIRED_FIELDS if name not in row]
    if missing or mid is None:
        raise OasstFormatError(mid, "missing_field", f"lacks field(s) {missing or ['message_id']}; "
                                                     f"every row needs {list(REQUIRED_FIELDS)}")
    if id_count[mid] > 1:
        raise OasstFormatError(mid, "duplicate_id", f"message_id appears {id_count[mid]} times; ids must be unique")
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        raise OasstFormatError(mid, "empty_text", f"text is {text!r}; every message needs non-blank text")
    if row["role"] not in ROLES:
        raise OasstFormatError(mid, "bad_role", f"role is {row['role']!r}; allowed: {list(ROLES)}")


def _cycle_member(start: Node, nodes: dict[str, Node]) -> str:
    """Follow parent links from an unreachable node until an id repeats: that id lies on the cycle."""
    seen: set[str] = set()
    mid = start.id
    while mid not in seen:
        seen.add(mid)
        mid = nodes[mid].message["parent_id"]
    return mid


def _build_one(rows: Sequence[Mapping[str, Any]], indices: list[int], id_count: Counter) -> Tree:
    """Link one tree's rows (they share message_tree_id) and check its structure."""
    nodes: dict[str, Node] = {}
    for i in indices:
        _check_row(rows[i], id_count)
        message = dict(rows[i])
        message.setdefault("parent_id", None)
        nodes[message["message_id"]] = Node(message, i)
    for node in nodes.values():
        parent = node.message["parent_id"]
        if parent is not None and parent not in nodes:
            raise OasstFormatError(node.id, "unknown_parent",
                                   f"parent_id {parent!r} is not a message of tree {node.message['message_tree_id']!r}")
    roots = [n for n in nodes.values() if n.message["parent_id"] is None]
    if len(roots) > 1:
        raise OasstFormatError(roots[1].id, "root", f"tree {roots[0].message['message_tree_id']!r} has "
                                                    f"{len(roots)} roots ({[r.id for r in roots]}); one allowed")
    for node in nodes.values():  # file order, so children end up in file order
        if node.message["parent_id"] is not None:
            nodes[node.message["parent_id"]].children.append(node)
    reached = {n.id for n in Tree(roots[0]).nodes()} if roots else set()
    if len(reached) < len(nodes):
        lost = next(n for n in nodes.values() if n.id not in reached)
        member = _cycle_member(lost, nodes)
        raise OasstFormatError(member, "cycle", "its parent links form a cycle, so it never reaches a root")
    tree = Tree(roots[0])
    if tree.root.role != "prompter":
        raise OasstFormatError(tree.root.id, "roles_alternate", f"a tree starts with a 'prompter' message, "
                                                                f"not {tree.root.role!r}")
    for node in tree.nodes():
        for child in node.children:
            if child.role == node.role:
                raise OasstFormatError(child.id, "roles_alternate", f"role {child.role!r} replies to a {node.role!r} "
                                                                    f"message ({node.id!r}); roles must alternate")
    return tree


def build_trees(messages: Iterable[Mapping[str, Any]], strict: bool = True) -> TreeList:
    """Link rows into trees; strict raises OasstFormatError, lenient skips bad trees and counts why."""
    rows = list(messages)
    id_count = Counter(row.get("message_id") for row in rows)
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("message_tree_id", row.get("message_id")), []).append(i)
    trees, skipped, errors = [], Counter(), []
    for indices in groups.values():
        try:
            trees.append(_build_one(rows, indices, id_count))
        except OasstFormatError as err:
            if strict:
                raise
            skipped[err.reason] += 1
            errors.append(err)
    return TreeList(trees, skipped, errors)


def _preference(node: Node) -> tuple[bool, int]:
    """Sort key: ranked before unranked, then lower rank; min() keeps file order among equals."""
    return (node.rank is None, node.rank if node.rank is not None else 0)


def best_path(tree: Tree | Node, drop_trailing_human: bool = True) -> list[dict[str, Any]]:
    """The messages from the root down, taking the eligible reply with the lowest rank at each level.

    A trailing human turn has no answer to learn from, so it is dropped (the published Guanaco set kept
    such turns in some rows; pass drop_trailing_human=False to keep them as it did).
    """
    node = tree.root if isinstance(tree, Tree) else tree
    if not node.eligible:
        return []
    path = [node]
    while True:
        replies = [child for child in node.children if child.eligible]
        if not replies:
            break
        node = min(replies, key=_preference)
        path.append(node)
    if drop_trailing_human and path[-1].role == "prompter":
        path.pop()
    return [n.message for n in path]
