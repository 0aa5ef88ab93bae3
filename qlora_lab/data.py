"""Guanaco text from OASST1 paths, and the tokenization with label masks the fine-tune trains on.

Each ready OASST1 tree becomes one training text, its best path (`qlora_lab.oasst`) in the format of
`timdettmers/openassistant-guanaco`:

    ### Human: {question}### Assistant: {answer}### Human: {follow-up}### Assistant: {answer}

Offline, `source="embedded"` reads `data/oasst_mini/`, a course-written set in OASST1's exact schema.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from . import smoke
from .oasst import (GUANACO_HUB, READY, ROLES, DataFileError, Tree, best_path, build_trees, check_split,
                    load_hub, load_oasst_messages)

MARKERS = {"prompter": "### Human: ", "assistant": "### Assistant: "}
IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


def to_guanaco_text(path: Sequence[Mapping[str, Any]]) -> str:
    """'### Human: q### Assistant: a...' exactly as timdettmers/openassistant-guanaco (turns joined with nothing)."""
    if not path:
        raise ValueError("path is empty; it needs at least one 'prompter' message")
    parts = []
    for position, message in enumerate(path):
        role, expected = message.get("role"), ROLES[position % 2]
        if role != expected:
            raise ValueError(f"message {message.get('message_id')!r} at position {position} has role {role!r}; "
                             f"a path alternates {list(ROLES)} starting with 'prompter', so {expected!r} was expected")
        text = (message.get("text") or "").strip()  # no separator between turns, so stray edges would glue on
        if not text:
            raise ValueError(f"message {message.get('message_id')!r} has empty text")
        parts.append(MARKERS[role] + text)
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- guanaco
def guanaco_rows(trees: Iterable[Tree], not_used: Counter | None = None) -> list[dict[str, Any]]:
    """One row per ready tree whose best path has an answer; `not_used` counts why the other trees gave none."""
    rows = []
    not_used = Counter() if not_used is None else not_used
    for tree in trees:
        if tree.state != READY:
            not_used[f"tree_state {tree.state!r}, not {READY!r}"] += 1
            continue
        path = best_path(tree)
        if len(path) < 2:
            not_used["no eligible answer on the best path (deleted or failed review)"] += 1
            continue
        rows.append({"text": to_guanaco_text(path), "lang": tree.lang, "message_tree_id": tree.tree_id,
                     "human_turns": sum(m["role"] == "prompter" for m in path)})
    return rows


def load_guanaco(source: str | os.PathLike = "embedded", split: str = "train"):
    """A datasets.Dataset with a `text` column in Guanaco format (plus lang, message_tree_id, human_turns)."""
    import datasets

    check_split(split)
    if str(source) == "guanaco-hub" and smoke.active():
        return load_guanaco("embedded", split)
    if str(source) == "guanaco-hub":  # the published set calls its held-out split "test"
        return load_hub(GUANACO_HUB, "test" if split == "validation" else split)
    trees = build_trees(load_oasst_messages(source, split), strict=False)
    if trees.skipped:
        warnings.warn(f"load_guanaco({str(source)!r}, {split!r}) skipped malformed trees: {dict(trees.skipped)} "
                      f"(first: {trees.errors[0]})", stacklevel=2)
    not_used: Counter = Counter()
    rows = guanaco_rows(trees, not_used)
    if not rows:
        reasons = {**{f"malformed ({k})": v for k, v in trees.skipped.items()}, **not_used}
        raise DataFileError(f"load_guanaco({str(source)!r}, {split!r}) found no usable conversation: "
                            f"{sum(reasons.values())} tree(s), none usable; why, counted: {reasons}")
    columns = ("text", "lang", "message_tree_id", "human_turns")
    return datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in columns})


# -------------------------------------------------------------------------------------------- collator
_MARKER_RE = re.compile(r"### (Human|Assistant):")


def split_turns(text: str) -> list[tuple[str, bool]]:
    """Cut Guanaco text into (piece, is_answer): prompts end with '### Assistant:', answers run to '### Human:'."""
    pieces: list[tuple[str, bool]] = []
    pos, in_answer = 0, False
    for match in _MARKER_RE.finditer(text):
        if match.group(1) == "Human":
            pieces.append((text[pos:match.start()], in_answer))
            pos, in_answer = match.start(), False
        else:
            pieces.append((text[pos:match.start()], in_answer))
            pieces.append((text[match.start():match.end()], False))
            pos, in_answer = match.end(), True
    pieces.append((text[pos:], in_answer))
    merged: list[tuple[str, bool]] = []
    for piece, is_answer in pieces:  # adjacent prompt pieces are tokenized as one string
        if not piece:
            continue
        if merged and merged[-1][1] == is_answer:
            merged[-1] = (merged[-1][0] + piece, is_answer)
        else:
            merged.append((piece, is_answer))
    return merged


@dataclass
class GuanacoCollator:
    """Tokenize Guanaco text for causal-LM training: labels only on answers (or all), EOS always last.

    Prompt and answer pieces are tokenized separately and joined (as qlora.py does with source and
    target), so label boundaries fall exactly on turn boundaries. Padding is masked by position, not by
    token id, because pad = EOS in many tokenizers. With transformers.Trainer set
    `remove_unused_columns=False` (the collator reads `text`) and, for length grouping,
    `train_sampling_strategy="group_by_length"` on a dataset from `with_lengths()`.
    """

    tokenizer: Any
    max_length: int = 512
    train_on: str = "assistant"
    pad_to_multiple_of: int | None = None
    #: "tokens" cuts at max_length wherever it falls (qlora.py's way, but keeping EOS); "turns" keeps the
    #: longest prefix of whole human/assistant exchanges that fits, so EOS follows a finished answer.
    truncation: str = "tokens"
    _bos: int | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.truncation not in ("tokens", "turns"):
            raise ValueError(f"truncation={self.truncation!r} is not one of ['tokens', 'turns']")
        if self.train_on not in ("assistant", "all"):
            raise ValueError(f"train_on={self.train_on!r} is not one of ['assistant', 'all']")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length={self.max_length!r}: need an int >= 2 (room for one token and EOS)")
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; set one so every example can end with it")
        probe = self.tokenizer("a")["input_ids"]  # add BOS only where the tokenizer itself would
        bos = self.tokenizer.bos_token_id
        self._bos = bos if bos is not None and probe and probe[0] == bos else None

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and labels of one text, cut to max_length with EOS kept as the last (labelled) token."""
        ids: list[int] = [] if self._bos is None else [self._bos]
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        pieces = [(self.tokenizer(piece, add_special_tokens=False)["input_ids"], is_answer)
                  for piece, is_answer in split_turns(text)]
        if self.truncation == "turns":
            pieces = self._whole_turns(pieces, self.max_length - 1 - len(ids))
        for tokens, is_answer in pieces:
            ids += tokens
            labels += tokens if (is_answer or self.train_on == "all") else [IGNORE_INDEX] * len(tokens)
        eos = self.tokenizer.eos_token_id
        return ids[: self.max_length - 1] + [eos], labels[: self.max_length - 1] + [eos]

    @staticmethod
    def _whole_turns(pieces: list[tuple[list[int], bool]], budget: int) -> list[tuple[list[int], bool]]:
        """The longest prefix ending with an answer that fits the budget (all pieces if none fits)."""
        used, best = 0, None
        for i, (tokens, is_answer) in enumerate(pieces):
            used += len(tokens)
            if used > budget:
                break
            if is_answer:
                best = i + 1
        return pieces[:best] if best else pieces

    @staticmethod
    def _text(feature: Any) -> str:
        if isinstance(feature, str):
            return feature
        if isinstance(feature, Mapping) and "text" in feature:
            return feature["text"]
        keys = sorted(feature) if isinstance(feature, Mapping) else type(feature).__name__
        raise ValueError(f"GuanacoCollator needs examples with a 'text' field, got {keys}; with "
                         "transformers.Trainer set TrainingArguments(remove_unused_columns=False)")

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        """Right-pad a batch: input_ids (pad id), attention_mask (0) and labels (-100) beyond each length."""
        import torch

        encoded = [self.encode(self._text(f)) for f in features]
        width = max(len(ids) for ids, _ in encoded)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            attention[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def lengths(self, dataset: Any) -> list[int]:
        """Collated length of every row (after truncation, EOS included): what group_by_length sorts by."""
        texts = dataset["text"] if not isinstance(dataset, (list, tuple)) else [self._text(f) for f in dataset]
        return [len(self.encode(text)[0]) for text in texts]

    def with_lengths(self, dataset: Any, column: str = "length"):
        """The dataset with a `length` column, which Trainer's group_by_length sampler reads."""
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        return dataset.add_column(column, self.lengths(dataset))


# ------------------------------------------------------------------------------------------------ stats
def dataset_stats(dataset: Any, tokenizer: Any) -> dict[str, Any]:
    """Rows, languages, human turns per row and token lengths (text only, no BOS/EOS) of a Guanaco set."""
    import numpy as np

    texts = list(dataset["text"])
    if not texts:
        raise ValueError("the dataset has no rows")
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    columns = getattr(dataset, "column_names", None) or list(dataset)
    langs = Counter(dataset["lang"]) if "lang" in columns else Counter()
    turns = Counter(text.count(MARKERS["prompter"].strip()) for text in texts)
    arr = np.array(lengths)
    return {
        "rows": len(texts),
        "languages": dict(langs.most_common()),
        "human_turns": dict(sorted(turns.items())),
        "tokens": {"min": int(arr.min()), "median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)),
                   "max": int(arr.max()), "mean": round(float(arr.mean()), 1), "total": int(arr.sum())},
        "lengths": lengths,
    }


def plot_length_histogram(stats: Mapping[str, Any], ax: Any = None, bins: int = 30,
                          max_length: int | None = None, title: str | None = None):
    """Histogram of token lengths from dataset_stats; a line at max_length shows what truncation cuts."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    lengths = stats["lengths"]
    ax.hist(lengths, bins=bins, color="#4c72b0", edgecolor="white")
    ax.axvline(stats["tokens"]["median"], color="black", linestyle=":", label=f"median {stats['tokens']['median']:.0f}")
    if max_length is not None:
        cut = sum(length > max_length for length in lengths)
        ax.axvline(max_length, color="#c44e52", label=f"max_length {max_length} ({cut} rows cut)")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title(title or f"{stats['rows']} rows")
    ax.legend(frameon=False)
    return ax
