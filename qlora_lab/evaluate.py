"""Judge a chat fine-tune: perplexity of the answers, Guanaco-style chat, and whether replies end cleanly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import bf16_cpu
from .checks import is_positive_number, is_whole
from .data import GuanacoCollator, to_guanaco_text

#: The system line the QLoRA paper put before Guanaco prompts at inference time.
GUANACO_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                  "gives helpful, detailed, and polite answers to the user's questions.")
TURN_MARKERS = ("### Human:", "### Assistant:")


@torch.no_grad()
def response_perplexity(model, tokenizer, dataset, max_length: int = 512, batch_size: int = 8) -> float:
    """exp(mean NLL) over assistant tokens only (EOS included): the loss the fine-tune optimises."""
    collator = GuanacoCollator(tokenizer, max_length=max_length, train_on="assistant")
    texts = list(dataset["text"]) if not isinstance(dataset, (list, tuple)) else list(dataset)
    if not texts:
        raise ValueError("response_perplexity needs at least one text; the dataset is empty")
    texts.sort(key=len)  # similar lengths per batch: less padding
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad(), bf16_cpu.off_for(model), bf16_cpu.reused_weights(model):
        for start in range(0, len(texts), batch_size):
            batch = collator(texts[start:start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                    shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += nll.item()
            count += int((shift_labels != -100).sum())
    model.train(was_training)
    return math.exp(total / count)


def guanaco_prompt(question: str, history: Sequence[tuple[str, str]] = (), system: str | None = GUANACO_SYSTEM) -> str:
    """The paper's inference prompt: system line, earlier turns, then '### Human: q### Assistant:'."""
    turns = []
    for human, assistant in history:
        turns += [{"role": "prompter", "text": human}, {"role": "assistant", "text": assistant}]
    turns.append({"role": "prompter", "text": question})
    body = to_guanaco_text(turns) + "### Assistant:"
    return f"{system} {body}" if system else body


@dataclass
class Reply:
    """One generated reply and how it ended."""

    text: str
    new_tokens: int
    ended_with_eos: bool
    wrote_other_turn: bool

    @property
    def clean(self) -> bool:
        """Said something, then ended by EOS within budget without writing the human's (or a new assistant) turn."""
        return self.ending == "EOS"

    @property
    def ending(self) -> str:
        """How the reply ended, in words: 'EOS', 'empty', 'wrote a turn marker' or 'ran out of tokens'."""
        if self.wrote_other_turn:
            return "wrote a turn marker"
        if self.ended_with_eos:
            return "EOS" if self.text else "empty"
        return "ran out of tokens"


def _marker_stop(tokenizer, prompt_len: int):
    from transformers import StoppingCriteria

    # A marker completed by the newest token lies within its last few tokens; decoding only those keeps each
    # step's check short instead of re-decoding the whole reply (a stopped row stays stopped in generate()).
    window = 2 * max(len(tokenizer(m, add_special_tokens=False)["input_ids"]) for m in TURN_MARKERS) + 2

    class StopAtMarker(StoppingCriteria):
        """Stop a row once its reply contains a turn marker: the model is writing the other speaker's part."""

        def __call__(self, input_ids, scores, **kwargs):
            tails = tokenizer.batch_decode(input_ids[:, max(prompt_len, input_ids.shape[1] - window):])
            return torch.tensor([any(m in t for m in TURN_MARKERS) for t in tails], device=input_ids.device)

    return StopAtMarker()


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 96, do_sample: bool = False,
                     temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 32,
                     repetition_penalty: float = 1.0) -> list[Reply]:
    """Generate in left-padded batches until EOS, a turn marker or the budget; say which ended each reply.

    One step of a batch costs little more than one step of a single row on a CPU (the weights are read once per
    step either way), so a larger batch finishes sooner: a batch runs as long as its longest reply.

    `repetition_penalty` divides the logits of tokens already in the text (Keskar et al., 2019, CTRL, proposed
    1.2): it stops the greedy loops small models fall into ("I can help. I can help. ...").
    """
    from transformers import StoppingCriteriaList

    if not is_whole(max_new_tokens, 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is not allowed: a whole number >= 1")
    if not is_positive_number(repetition_penalty):
        raise ValueError(f"repetition_penalty={repetition_penalty!r} is not allowed: a finite number > 0 "
                         "(1.0 = none, 1.2 = CTRL's)")
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = dict(do_sample=do_sample, repetition_penalty=float(repetition_penalty))
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    replies: list[Reply] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    try:
        with bf16_cpu.off_for(model), bf16_cpu.reused_weights(model):
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt",
                                  padding=True).to(device)
                width = batch["input_ids"].shape[1]
                out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id,
                                     stopping_criteria=StoppingCriteriaList([_marker_stop(tokenizer, width)]),
                                     **kwargs)
                replies += [_reply(tokenizer, row[width:].tolist()) for row in out]
    finally:
        tokenizer.padding_side = side
    return replies


def _reply(tokenizer, new: list[int]) -> Reply:
    """Cut a generated continuation at EOS or at a turn marker, recording which happened."""
    ended_with_eos = tokenizer.eos_token_id in new
    if ended_with_eos:
        new = new[: new.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(new, skip_special_tokens=True)
    cut = min([text.find(m) for m in TURN_MARKERS if m in text], default=-1)
    if cut >= 0:  # generation stopped at the marker; any EOS after it is the batch's padding
        text, ended_with_eos = text[:cut], False
    return Reply(text.strip(), len(new), ended_with_eos, cut >= 0)


def generate_reply(model, tokenizer, prompt: str, max_new_tokens: int = 96, do_sample: bool = False,
                   temperature: float = 0.7, top_p: float = 0.9, repetition_penalty: float = 1.0) -> Reply:
    """One reply (see generate_replies)."""
    return generate_replies(model, tokenizer, [prompt], max_new_tokens, do_sample, temperature, top_p,
                            repetition_penalty=repetition_penalty)[0]


def chat(model, tokenizer, question: str, history: Sequence[tuple[str, str]] = (), max_new_tokens: int = 96,
         do_sample: bool = False, system: str | None = GUANACO_SYSTEM, repetition_penalty: float = 1.0) -> str:
    """Answer one question in Guanaco format, stopping at EOS or the next '### Human:'."""
    prompt = guanaco_prompt(question, history, system)
    return generate_reply(model, tokenizer, prompt, max_new_tokens, do_sample,
                          repetition_penalty=repetition_penalty).text


def format_adherence(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 96,
                     system: str | None = GUANACO_SYSTEM, repetition_penalty: float = 1.0, batch_size: int = 32,
                     ) -> tuple[float, list[Reply]]:
    """Share of greedy replies that end cleanly (non-empty, EOS within budget, no other speaker's turn)."""
    if not prompts:
        raise ValueError("format_adherence needs at least one prompt")
    replies = generate_replies(model, tokenizer, [guanaco_prompt(q, system=system) for q in prompts], max_new_tokens,
                               batch_size=batch_size, repetition_penalty=repetition_penalty)
    return sum(r.clean for r in replies) / len(replies), replies


def first_questions(dataset, n: int | None = None) -> list[str]:
    """The opening human question of each conversation (held-out prompts for adherence and chat)."""
    from .data import split_turns

    questions = []
    for text in dataset["text"]:
        first = split_turns(text)[0][0]
        questions.append(first.removeprefix("### Human:").removesuffix("### Assistant:").strip())
    return questions[:n] if n else questions
