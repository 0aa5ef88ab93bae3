"""qlora_lab.data: the shipped mini OASST1 matches OASST1's schema and the course's counts; trees, best paths,
Guanaco text and the collator's labels behave as specified, including every malformed-tree case."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import math
import uuid
from collections import Counter, defaultdict

import pytest
import torch

from qlora_lab import data, models, oasst

STATES = {"ready_for_export", "growing", "aborted_low_grade", "halted_by_moderator"}
DETOXIFY_KEYS = {"toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit"}


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shipped():
    """Rows of both shipped splits, read straight from the files (not through the loader)."""
    out = {}
    for split in oasst.SPLITS:
        path = oasst.embedded_dir() / f"{split}.jsonl"
        out[split] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


@pytest.fixture(scope="module")
def trees(shipped):
    return {split: oasst.build_trees(rows, strict=True) for split, rows in shipped.items()}


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer()


def msg(mid, parent, role, text="some text", tree="t1", **extra):
    """A minimal OASST row for hand-made trees."""
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "message_tree_id": tree,
            "tree_state": "ready_for_export", "lang": "en", "deleted": False, "review_result": True,
            "rank": None, **extra}


def good_tree(tree="t1"):
    """q -> (a0 rank 1, a1 rank 0 -> q2 -> a2), q written first: a1 must win although a0 comes first."""
    p = f"{tree}-"
    return [
        msg(p + "q", None, "prompter", "Question?", tree),
        msg(p + "a0", p + "q", "assistant", "Weaker answer.", tree, rank=1),
        msg(p + "a1", p + "q", "assistant", "Better answer.", tree, rank=0),
        msg(p + "q2", p + "a1", "prompter", "Follow-up?", tree),
        msg(p + "a2", p + "q2", "assistant", "Second answer.", tree, rank=0),
    ]


def is_uuid(value) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, TypeError, AttributeError):
        return False


# ------------------------------------------------------------------------------------ shipped files: schema
def test_every_row_has_exactly_the_oasst1_fields_with_the_right_types(shipped):
    for split, rows in shipped.items():
        assert rows, split
        for row in rows:
            mid = row.get("message_id")
            assert tuple(row) == oasst.OASST_FIELDS, mid
            assert is_uuid(row["message_id"]) and is_uuid(row["user_id"]) and is_uuid(row["message_tree_id"]), mid
            assert row["parent_id"] is None or is_uuid(row["parent_id"]), mid
            created = dt.datetime.fromisoformat(row["created_date"])
            assert created.tzinfo is not None and created.utcoffset() == dt.timedelta(0), mid
            assert isinstance(row["text"], str) and row["text"] == row["text"].strip() and row["text"], mid
            assert row["role"] in oasst.ROLES and row["lang"] in {"en", "ko", "es", "de", "fr"}, mid
            assert type(row["review_count"]) is int and 3 <= row["review_count"] <= 5, mid
            assert row["review_result"] in (True, False, None) and type(row["deleted"]) is bool, mid
            assert row["rank"] is None or (type(row["rank"]) is int and row["rank"] >= 0), mid
            assert row["synthetic"] is False and row["model_name"] is None, mid
            tox = row["detoxify"]
            assert tox is None or (set(tox) == DETOXIFY_KEYS and all(type(v) is float and 0 <= v <= 1
                                                                     for v in tox.values())), mid
            assert row["tree_state"] in STATES, mid
            emojis = row["emojis"]
            if emojis is not None:
                assert set(emojis) == {"name", "count"} and len(emojis["name"]) == len(emojis["count"]) > 0, mid
                assert all(type(n) is str for n in emojis["name"]) and all(type(c) is int and c > 0
                                                                           for c in emojis["count"]), mid
            labels = row["labels"]
            if labels is not None:
                assert set(labels) == {"name", "value", "count"}, mid
                assert len(labels["name"]) == len(labels["value"]) == len(labels["count"]) > 0, mid
                assert all(type(v) is float and 0 <= v <= 1 for v in labels["value"]), mid
                assert all(type(c) is int and 1 <= c <= row["review_count"] for c in labels["count"]), mid
            assert "### Human:" not in row["text"] and "### Assistant:" not in row["text"], mid


def test_ids_dates_and_tree_fields_are_consistent(shipped):
    rows = shipped["train"] + shipped["validation"]
    by_id = {r["message_id"]: r for r in rows}
    assert len(by_id) == len(rows), "message ids must be unique across both files"
    for row in rows:
        if row["parent_id"] is None:
            assert row["message_tree_id"] == row["message_id"], "as in OASST1, a tree's id is its root's id"
            assert row["role"] == "prompter"
        else:
            parent = by_id[row["parent_id"]]
            assert row["created_date"] > parent["created_date"], row["message_id"]
            assert row["user_id"] != parent["user_id"], row["message_id"]
            for key in ("message_tree_id", "tree_state", "lang"):
                assert row[key] == parent[key], (row["message_id"], key)


def test_ranks_exist_only_among_assistant_siblings_and_are_distinct(shipped):
    for rows in shipped.values():
        siblings = defaultdict(list)
        for row in rows:
            if row["role"] == "prompter":
                assert row["rank"] is None, row["message_id"]
            siblings[row["parent_id"]].append(row["rank"])
        for parent, ranks in siblings.items():
            ranked = [r for r in ranks if r is not None]
            assert len(ranked) == len(set(ranked)), (parent, ranks)


def test_split_is_by_tree_and_both_splits_pass_strict_checks(shipped, trees):
    ids = {split: {r["message_tree_id"] for r in rows} for split, rows in shipped.items()}
    assert not ids["train"] & ids["validation"]
    prompts = {split: {" ".join(r["text"].lower().split()) for r in rows if r["parent_id"] is None}
               for split, rows in shipped.items()}
    assert not prompts["train"] & prompts["validation"], "the same question must not open trees in both splits"
    for split in oasst.SPLITS:
        assert not trees[split].skipped
        assert sum(len(t) for t in trees[split]) == len(shipped[split])


# ------------------------------------------------------------------------------------ shipped files: counts
def test_the_set_meets_the_issues_counts(shipped, trees):
    everything = trees["train"] + trees["validation"]
    langs = Counter(t.lang for t in everything)
    assert len(everything) >= 200, len(everything)
    assert sum(len(rows) for rows in shipped.values()) >= 900
    assert len(trees["validation"]) >= 20
    for lang in ("ko", "es", "de", "fr"):
        assert langs[lang] >= 8, (lang, langs)
    assert langs["en"] > len(everything) / 2, langs
    ready = [t for t in everything if t.state == oasst.READY]
    multi = sum(sum(m["role"] == "prompter" for m in oasst.best_path(t)) >= 2 for t in ready)
    assert multi >= len(ready) / 3, (multi, len(ready))


def test_every_tree_has_a_ranked_group_of_two_or_more_assistant_replies(trees):
    for tree in trees["train"] + trees["validation"]:
        groups = [[c for c in n.children if c.role == "assistant" and c.rank is not None] for n in tree.nodes()]
        best = max(groups, key=len)
        assert len(best) >= 2 and 0 in {c.rank for c in best}, tree.tree_id


def test_the_dirt_is_present_and_the_loader_removes_it(shipped, tok):
    rows = shipped["train"] + shipped["validation"]
    assert any(r["deleted"] for r in rows)
    assert any(r["review_result"] is False for r in rows)
    not_ready = {r["message_tree_id"] for r in rows if r["tree_state"] != oasst.READY}
    assert not_ready
    texts, tree_ids = [], set()
    for split in oasst.SPLITS:
        ds = data.load_guanaco("embedded", split)
        texts += ds["text"]
        tree_ids |= set(ds["message_tree_id"])
    assert not tree_ids & not_ready
    joined = "\n".join(texts)
    for r in rows:
        if r["deleted"] or r["review_result"] is False:
            assert r["text"] not in joined, r["message_id"]
    ready = {r["message_tree_id"] for r in rows} - not_ready
    assert tree_ids == ready  # every ready tree gives one row


# ---------------------------------------------------------------------------------------------- build_trees
def test_build_trees_links_children_in_file_order():
    rows = good_tree()
    del rows[0]["parent_id"]  # exports may leave out None fields: a missing parent_id is a root
    built = oasst.build_trees(rows)
    assert len(built) == 1 and not built.skipped and not built.errors
    tree = built[0]
    assert tree.tree_id == "t1" and tree.state == oasst.READY and len(tree) == 5
    assert [c.id for c in tree.root.children] == ["t1-a0", "t1-a1"]


@pytest.mark.parametrize("case, bad_id, reason", [
    ("unknown_parent", "t1-a2", "unknown_parent"),
    ("cycle", "t1-x", "cycle"),
    ("self_parent", "t1-x", "cycle"),
    ("duplicate", "t1-a1", "duplicate_id"),
    ("assistant_to_assistant", "t1-q2", "roles_alternate"),
    ("assistant_root", "t1-q", "roles_alternate"),
    ("empty_text", "t1-a0", "empty_text"),
    ("blank_text", "t1-a0", "empty_text"),
    ("none_text", "t1-a0", "empty_text"),
    ("two_roots", "t1-r2", "root"),
    ("bad_role", "t1-a0", "bad_role"),
    ("missing_field", "t1-a0", "missing_field"),
])
def test_build_trees_strict_names_the_bad_message(case, bad_id, reason):
    rows = broken(case)
    with pytest.raises(oasst.OasstFormatError) as info:
        oasst.build_trees(rows)
    assert info.value.message_id == bad_id and info.value.reason == reason
    assert repr(bad_id) in str(info.value)
    assert isinstance(info.value, ValueError)


def broken(case: str) -> list[dict]:
    """good_tree() with one defect."""
    rows = good_tree()
    by = {r["message_id"]: r for r in rows}
    if case == "unknown_parent":
        by["t1-a2"]["parent_id"] = "nowhere"
    elif case == "cycle":  # x and y point at each other: neither reaches the root
        rows += [msg("t1-x", "t1-y", "assistant"), msg("t1-y", "t1-x", "prompter")]
    elif case == "self_parent":
        rows.append(msg("t1-x", "t1-x", "assistant"))
    elif case == "duplicate":
        rows.append(dict(by["t1-a1"], text="a second row with the same id"))
    elif case == "assistant_to_assistant":
        by["t1-q2"]["role"] = "assistant"
    elif case == "assistant_root":
        by["t1-q"]["role"] = "assistant"
        by["t1-a0"]["role"] = by["t1-a1"]["role"] = "prompter"
        by["t1-q2"]["role"], by["t1-a2"]["role"] = "assistant", "prompter"
    elif case == "empty_text":
        by["t1-a0"]["text"] = ""
    elif case == "blank_text":
        by["t1-a0"]["text"] = " \n\t"
    elif case == "none_text":
        by["t1-a0"]["text"] = None
    elif case == "two_roots":
        rows.append(msg("t1-r2", None, "prompter"))
    elif case == "bad_role":
        by["t1-a0"]["role"] = "user"
    elif case == "missing_field":
        del by["t1-a0"]["role"]
    return rows


def test_build_trees_lenient_skips_bad_trees_and_counts_why():
    rows = good_tree("ok1") + good_tree("ok2")
    for n, reason in enumerate(["unknown_parent", "cycle", "empty_text", "empty_text", "assistant_to_assistant"]):
        tree = f"bad{n}"
        case = broken(reason)
        for r in case:  # move the broken tree to its own tree id and message ids
            r["message_tree_id"] = tree
            r["message_id"] = r["message_id"].replace("t1-", tree + "-")
            if r["parent_id"]:
                r["parent_id"] = r["parent_id"].replace("t1-", tree + "-")
        rows += case
    rows += good_tree("dup") + [msg("dup-q", None, "prompter", tree="dup2")]  # one id in two trees: both go
    built = oasst.build_trees(rows, strict=False)
    assert sorted(t.tree_id for t in built) == ["ok1", "ok2"]
    assert built.skipped == Counter({"unknown_parent": 1, "cycle": 1, "empty_text": 2, "roles_alternate": 1,
                                     "duplicate_id": 2})
    assert len(built.errors) == 7 and all(isinstance(e, oasst.OasstFormatError) for e in built.errors)
    with pytest.raises(oasst.OasstFormatError):
        oasst.build_trees(rows, strict=True)


# ------------------------------------------------------------------------------------------------ best_path
def path_ids(rows, **kw):
    return [m["message_id"] for m in oasst.best_path(oasst.build_trees(rows)[0], **kw)]


def test_best_path_takes_the_lowest_rank_at_every_level():
    assert path_ids(good_tree()) == ["t1-q", "t1-a1", "t1-q2", "t1-a2"]


def test_best_path_skips_deleted_and_spam_but_not_unreviewed():
    rows = good_tree()
    rows.insert(1, msg("t1-spam", "t1-q", "assistant", "Buy now!", rank=0, review_result=False))
    by = {r["message_id"]: r for r in rows}
    by["t1-a1"]["rank"] = 1
    by["t1-a0"].update(rank=2, deleted=True)
    # the spam has rank 0 and the deleted a0 is otherwise eligible: a1 (rank 1) must be chosen
    assert path_ids(rows)[:2] == ["t1-q", "t1-a1"]
    by["t1-a1"]["review_result"] = None  # never reviewed: still eligible
    assert path_ids(rows)[:2] == ["t1-q", "t1-a1"]


def test_best_path_puts_unranked_after_ranked_and_breaks_ties_by_file_order():
    rows = [msg("q", None, "prompter"), msg("u", "q", "assistant"), msg("r1", "q", "assistant", rank=1),
            msg("r1b", "q", "assistant", rank=1)]
    assert path_ids(rows) == ["q", "r1"]  # unranked u comes first in the file but loses; tie r1/r1b: file order
    rows = [msg("q", None, "prompter"), msg("u1", "q", "assistant"), msg("u2", "q", "assistant")]
    assert path_ids(rows) == ["q", "u1"]
    rows = [msg("q", None, "prompter"), msg("n", "q", "assistant", rank=math.nan), msg("r", "q", "assistant", rank=3)]
    assert path_ids(rows) == ["q", "r"]  # NaN (pandas' missing rank) counts as unranked


def test_best_path_drops_a_trailing_human_turn():
    rows = good_tree()[:4]  # q -> a1 -> q2 with no answer
    assert path_ids(rows) == ["t1-q", "t1-a1"]
    assert path_ids(rows, drop_trailing_human=False) == ["t1-q", "t1-a1", "t1-q2"]
    rows = good_tree()
    rows[-1]["deleted"] = True  # the only answer to q2 is deleted: q2 becomes trailing
    assert path_ids(rows) == ["t1-q", "t1-a1"]


def test_best_path_is_empty_when_nothing_usable():
    assert path_ids([msg("q", None, "prompter")]) == []
    rows = good_tree()
    rows[0]["deleted"] = True
    assert path_ids(rows) == []
    rows = [msg("q", None, "prompter"), msg("a", "q", "assistant", review_result=False, rank=0)]
    assert path_ids(rows) == []


# ------------------------------------------------------------------------------------------ guanaco format
def test_to_guanaco_text_is_the_published_format():
    path = oasst.best_path(oasst.build_trees(good_tree())[0])
    assert data.to_guanaco_text(path) == ("### Human: Question?### Assistant: Better answer."
                                          "### Human: Follow-up?### Assistant: Second answer.")
    padded = [dict(path[0], text="  Question?\n"), dict(path[1], text="\nBetter answer.\n\n")]
    assert data.to_guanaco_text(padded) == "### Human: Question?### Assistant: Better answer."


def test_to_guanaco_text_rejects_bad_paths():
    q, a = msg("q", None, "prompter", "Q"), msg("a", "q", "assistant", "A")
    for bad in ([], [a, q], [q, dict(a, role="prompter")], [q, dict(a, text=" ")]):
        with pytest.raises(ValueError):
            data.to_guanaco_text(bad)


def test_load_guanaco_embedded_rows_are_well_formed(tok):
    ds = data.load_guanaco("embedded", "validation")
    assert {"text", "lang", "message_tree_id", "human_turns"} <= set(ds.column_names) and len(ds) > 0
    for row in ds:
        text = row["text"]
        assert text.startswith("### Human: ")
        pieces = data.split_turns(text)
        assert pieces[-1][1] is True, "every row ends with an answer"
        assert text.count("### Human: ") == row["human_turns"] == text.count("### Assistant: ")


def test_split_turns_round_trips_and_marks_answers():
    text = "### Human: Q1### Assistant: A1### Human: Q2### Assistant: A2"
    pieces = data.split_turns(text)
    assert "".join(p for p, _ in pieces) == text
    assert pieces == [("### Human: Q1### Assistant:", False), (" A1", True),
                      ("### Human: Q2### Assistant:", False), (" A2", True)]


# ----------------------------------------------------------------------------------------------- collator
def label_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for token in labels:
        if token == data.IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(token)
    return spans + ([current] if current else [])


def answers(text: str) -> list[str]:
    return [p for p, is_answer in data.split_turns(text) if is_answer]


def test_labels_decode_to_the_assistant_turns_plus_eos(tok):
    ds = data.load_guanaco("embedded", "train")
    row = next(r for r in ds if r["human_turns"] >= 2)
    collator = data.GuanacoCollator(tok, max_length=4096)
    batch = collator([row])
    decoded = [tok.decode(span, clean_up_tokenization_spaces=False) for span in label_spans(batch["labels"][0].tolist())]
    expected = answers(row["text"])
    expected[-1] += tok.eos_token
    assert decoded == expected and len(decoded) >= 2
    assert all(e.startswith(" ") for e in expected)  # the space after "### Assistant:" belongs to the answer
    assert tok.decode(batch["input_ids"][0], clean_up_tokenization_spaces=False) == row["text"] + tok.eos_token


def test_train_on_all_labels_every_token(tok):
    text = data.load_guanaco("embedded", "validation")[0]["text"]
    batch = data.GuanacoCollator(tok, max_length=4096, train_on="all")([{"text": text}])
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_eos_survives_truncation(tok):
    text = max(data.load_guanaco("embedded", "validation")["text"], key=len)
    full = data.GuanacoCollator(tok, max_length=4096)([text])
    cut = data.GuanacoCollator(tok, max_length=24)([text])
    assert full["input_ids"].shape[1] > 24 and cut["input_ids"].shape[1] == 24
    assert cut["input_ids"][0, -1] == tok.eos_token_id and cut["labels"][0, -1] == tok.eos_token_id
    assert torch.equal(cut["input_ids"][0, :-1], full["input_ids"][0, :23])
    assert torch.equal(cut["labels"][0, :-1], full["labels"][0, :23])
    tiny = data.GuanacoCollator(tok, max_length=6)([text])  # cut inside the first question
    assert tiny["labels"][0].tolist() == [data.IGNORE_INDEX] * 5 + [tok.eos_token_id]


def test_padding_is_masked_by_position_not_by_token_id(tok):
    assert tok.pad_token_id == tok.eos_token_id  # what makes masking by id wrong for this tokenizer
    short = "### Human: Hi### Assistant: Hello."
    long = "### Human: Tell me a story### Assistant: Once upon a time there was a small robot."
    batch = data.GuanacoCollator(tok, max_length=512)([short, long])
    n = int(batch["attention_mask"][0].sum())
    assert n < batch["input_ids"].shape[1]
    assert batch["labels"][0, n - 1] == tok.eos_token_id  # the real EOS is a label ...
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()  # ... padding has the same id ...
    assert (batch["labels"][0, n:] == data.IGNORE_INDEX).all()  # ... but is masked
    assert (batch["attention_mask"][0, n:] == 0).all() and batch["attention_mask"][1].all()
    assert data.GuanacoCollator(tok, max_length=512, pad_to_multiple_of=8)([short, long])["input_ids"].shape[1] % 8 == 0


def test_lengths_match_the_batches_and_feed_group_by_length(tok):
    ds = data.load_guanaco("embedded", "validation")
    collator = data.GuanacoCollator(tok, max_length=256)
    lengths = collator.lengths(ds)
    assert lengths == [int(collator([r])["attention_mask"].sum()) for r in ds]
    assert max(lengths) == 256 and min(lengths) < 256
    assert collator.with_lengths(ds)["length"] == lengths


def test_collator_rejects_bad_settings_and_inputs(tok):
    with pytest.raises(ValueError, match="train_on"):
        data.GuanacoCollator(tok, 64, train_on="human")
    with pytest.raises(ValueError, match="max_length"):
        data.GuanacoCollator(tok, 1)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        data.GuanacoCollator(tok, 64)([{"input_ids": [1, 2]}])


def test_collator_works_with_transformers_trainer(tok, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    collator = data.GuanacoCollator(tok, max_length=64)
    train = collator.with_lengths(data.load_guanaco("embedded", "validation"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             train_sampling_strategy="group_by_length", remove_unused_columns=False,
                             report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 2 and len(losses) == 2
    assert all(math.isfinite(x) and 0 < x < 2 * math.log(len(tok)) for x in losses)


# ------------------------------------------------------------------------------------- sources and errors
def test_paths_in_jsonl_and_parquet_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = oasst.load_oasst_messages("embedded", "validation")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "validation.parquet")
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert oasst.load_oasst_messages(tmp_path / "v.jsonl") == rows
    with gzip.open(tmp_path / "v.messages.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write((tmp_path / "v.jsonl").read_text())
    assert oasst.load_oasst_messages(tmp_path / "v.messages.jsonl.gz") == rows
    from_parquet = data.load_guanaco(tmp_path, "validation")  # a folder: <split>.parquet
    assert from_parquet["text"] == data.load_guanaco("embedded", "validation")["text"]


@pytest.mark.parametrize("source", ["hub", "guanaco-hub"])
def test_hub_sources_fail_offline_with_a_clear_message(source, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    load = oasst.load_oasst_messages if source == "hub" else data.load_guanaco
    with pytest.raises(oasst.DataNotAvailableError) as info:
        load(source, "validation")
    hub_id = oasst.OASST_HUB if source == "hub" else oasst.GUANACO_HUB
    assert hub_id in str(info.value) and "source='embedded'" in str(info.value)


def test_bad_source_and_split_are_named():
    with pytest.raises(ValueError, match="'embeded'"):
        oasst.load_oasst_messages("embeded")
    with pytest.raises(ValueError, match="'test'"):
        data.load_guanaco("embedded", "test")
    with pytest.raises(ValueError, match="load_guanaco"):
        oasst.load_oasst_messages("guanaco-hub")


# ----------------------------------------------------------------------------------------------- stats
def test_dataset_stats_and_histogram(tok):
    import matplotlib

    matplotlib.use("Agg")
    ds = data.load_guanaco("embedded", "validation")
    stats = data.dataset_stats(ds, tok)
    assert stats["rows"] == len(ds) == sum(stats["languages"].values()) == sum(stats["human_turns"].values())
    assert stats["lengths"] == [len(tok(t, add_special_tokens=False)["input_ids"]) for t in ds["text"]]
    t = stats["tokens"]
    assert t["min"] <= t["median"] <= t["p90"] <= t["max"] and t["total"] == sum(stats["lengths"])
    ax = data.plot_length_histogram(stats, max_length=512)
    assert sum(p.get_height() for p in ax.patches) == len(ds)
    matplotlib.pyplot.close("all")


def test_turn_truncation_keeps_whole_exchanges(tok):
    text = "### Human: Name a colour.### Assistant: Blue.### Human: Another one?### Assistant: " + "Green " * 80
    collator = data.GuanacoCollator(tok, max_length=40, truncation="turns")
    ids, labels = collator.encode(text)
    assert tok.decode(ids).endswith("Blue." + tok.eos_token)  # the long second answer is dropped whole
    assert labels[-1] == tok.eos_token_id
    too_long = "### Human: Hi### Assistant: " + "word " * 100
    ids, labels = collator.encode(too_long)  # nothing whole fits: fall back to cutting tokens
    assert len(ids) == 40 and labels[-1] == tok.eos_token_id
    with pytest.raises(ValueError, match="truncation='words'"):
        data.GuanacoCollator(tok, max_length=40, truncation="words")
