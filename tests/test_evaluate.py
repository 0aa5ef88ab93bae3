"""evaluate: how a reply ended, what counts as clean, the Guanaco prompt, and bad generation settings."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_lab import evaluate, models


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(None)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_reply_ending_with_eos_is_clean(tokenizer):
    r = evaluate._reply(tokenizer, ids(tokenizer, " Blue light scatters more.") + [tokenizer.eos_token_id, 0, 0])
    assert (r.text, r.ended_with_eos, r.wrote_other_turn, r.clean, r.ending) == (
        "Blue light scatters more.", True, False, True, "EOS")
    assert r.new_tokens == len(ids(tokenizer, " Blue light scatters more."))


def test_reply_that_writes_the_next_turn_is_cut_and_not_clean(tokenizer):
    new = ids(tokenizer, " Sure, here it is.### Human: thanks") + [tokenizer.eos_token_id]
    r = evaluate._reply(tokenizer, new)
    assert r.text == "Sure, here it is."
    assert r.wrote_other_turn and not r.ended_with_eos and not r.clean
    assert r.ending == "wrote a turn marker"


def test_reply_that_runs_out_of_tokens_is_not_clean(tokenizer):
    r = evaluate._reply(tokenizer, ids(tokenizer, " I can help. I can help. I can help."))
    assert not r.clean and r.ending == "ran out of tokens"


def test_empty_reply_is_not_clean(tokenizer):
    """An immediate EOS ends the turn but says nothing: it must not count as adherence."""
    r = evaluate._reply(tokenizer, [tokenizer.eos_token_id])
    assert r.ended_with_eos and not r.clean and r.ending == "empty"


def test_guanaco_prompt_matches_the_paper_format():
    p = evaluate.guanaco_prompt("And in French?", history=[("Say hi.", "Hi!")], system=None)
    assert p == "### Human: Say hi.### Assistant: Hi!### Human: And in French?### Assistant:"
    assert evaluate.guanaco_prompt("q").startswith(evaluate.GUANACO_SYSTEM + " ### Human: q")


def test_first_questions_strip_the_markers():
    rows = {"text": ["### Human: Why?### Assistant: Because.", "### Human: How?### Assistant: So.### Human: Ok"]}
    assert evaluate.first_questions(rows) == ["Why?", "How?"]
    assert evaluate.first_questions(rows, 1) == ["Why?"]


@pytest.mark.parametrize("bad", [0, -1.2, math.nan, math.inf, "1.2"])
def test_bad_repetition_penalty_is_named(bad):
    with pytest.raises(ValueError, match="repetition_penalty=.*finite number > 0"):
        evaluate.generate_replies(None, None, ["q"], repetition_penalty=bad)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_budget_is_named(bad):
    with pytest.raises(ValueError, match=r"max_new_tokens=.*whole number >= 1"):
        evaluate.generate_replies(None, None, ["q"], max_new_tokens=bad)


def test_format_adherence_needs_prompts():
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate.format_adherence(None, None, [])


def test_repetition_penalty_reaches_generate(tokenizer):
    """The penalty must reach generate(): it changes what a tiny looping model writes, deterministically."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)  # tied: it predicts the token it just read, so it loops
    model = LlamaForCausalLM(config).eval()
    prompts = [evaluate.guanaco_prompt("Why is the sky blue?", system=None), evaluate.guanaco_prompt("Hi", system=None)]
    side = tokenizer.padding_side
    plain = evaluate.generate_replies(model, tokenizer, prompts, max_new_tokens=24)
    penalised = evaluate.generate_replies(model, tokenizer, prompts, max_new_tokens=24, repetition_penalty=1.2)
    assert [r.text for r in plain] != [r.text for r in penalised]
    again = evaluate.generate_replies(model, tokenizer, prompts, max_new_tokens=24, repetition_penalty=1.2)
    assert [r.text for r in again] == [r.text for r in penalised]  # greedy: the same replies every run
    assert tokenizer.padding_side == side  # left padding for generation is undone afterwards


def test_marker_check_reads_only_the_newest_tokens_and_still_stops(tokenizer):
    """The stopping check decodes a short window; a marker completed by the newest token is always inside it."""
    prompt = ids(tokenizer, "### Human: Hi### Assistant:")
    reply = ids(tokenizer, " Hello there, and here is a long answer that goes on for a while." * 3)
    marker = ids(tokenizer, "### Human:")
    stop = evaluate._marker_stop(tokenizer, len(prompt))
    done = [bool(stop(torch.tensor([prompt + reply + marker[:k]]), None)[0]) for k in range(len(marker) + 1)]
    assert done == [False] * len(marker) + [True]  # stops exactly when the marker is complete
    assert not bool(stop(torch.tensor([prompt]), None)[0])  # the prompt's own markers do not count
