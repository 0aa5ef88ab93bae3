"""Judging chatbots as the QLoRA paper did (arXiv 2305.14314, sections 5.2-5.3): "% of ChatGPT" scores, Elo over
random match orders, plus an order-free Bradley-Terry fit and the judge's order bias; for GPT-4's published
verdicts (data/paper_eval/) and for any judge of our own models, a person voting included."""

from __future__ import annotations

import html
import re
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

PAIRWISE_COLUMNS = ("benchmark", "question_id", "assistant_1", "assistant_2", "winner")
RELATIVE_COLUMNS = ("benchmark", "question_id", "assistant_1", "assistant_2", "score_1", "score_2")
#: Verdict codes of the paper's three-class prompt; -1 marks a judge reply the script could not parse.
WINNER_CODES = {1: "assistant 1 better", 2: "assistant 2 better", 3: "tie", -1: "unparsable"}
UNPARSED = -1

Judge = Callable[[Sequence[tuple[int, str, str]]], Sequence[int]]


class JudgmentFormatError(ValueError):
    """A judgments file or table that cannot be read; the message names the file, line, value and what is allowed."""


def paper_eval_dir() -> Path:
    """data/paper_eval in the checkout: the paper's GPT-4 judgments (numbers only) and their CARD.md."""
    from .paths import repo_root

    return repo_root() / "data" / "paper_eval"


def _read(path: str | Path, columns: Sequence[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise JudgmentFormatError(f"No judgments file {path.name} in {path.parent.name}/")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise JudgmentFormatError(f"{path.name} lacks column(s) {missing}; expected {list(columns)}, "
                                  f"found {list(table.columns)}")
    return table


def _numbers(table: pd.DataFrame, column: str, path: Path, ok: Callable[[pd.Series], pd.Series],
             allowed: str) -> pd.Series:
    """The column as numbers; the first value outside `allowed` is reported with its file line (header = 1)."""
    values = pd.to_numeric(table[column], errors="coerce")
    bad = values.isna() | ~ok(values)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise JudgmentFormatError(f"{path.name} line {row + 2}: {column}={table[column].iloc[row]!r} is not "
                                  f"allowed; {column} must be {allowed}")
    return values


def load_pairwise(path: str | Path | None = None, benchmark: str | None = None) -> pd.DataFrame:
    """Pairwise verdicts (gpt4_pairwise.csv by default), checked: known columns, winner codes 1/2/3/-1."""
    path = Path(path) if path else paper_eval_dir() / "gpt4_pairwise.csv"
    table = _read(path, PAIRWISE_COLUMNS)
    codes = ", ".join(f"{k} = {v}" for k, v in WINNER_CODES.items())
    table["winner"] = _numbers(table, "winner", path, lambda v: v.isin(list(WINNER_CODES)),
                               f"one of {list(WINNER_CODES)} ({codes})").astype(int)
    return _pick(table, benchmark, path)


def load_relative(path: str | Path | None = None, benchmark: str | None = None) -> pd.DataFrame:
    """Scores out of 10 for two answers (gpt4_relative.csv by default), checked: 0..10, or -1 when unparsable."""
    path = Path(path) if path else paper_eval_dir() / "gpt4_relative.csv"
    table = _read(path, RELATIVE_COLUMNS)
    for column in ("score_1", "score_2"):
        table[column] = _numbers(table, column, path, lambda v: v.between(0, 10) | (v == UNPARSED),
                                 "a number from 0 to 10, or -1 (judge reply unparsable)")
    return _pick(table, benchmark, path)


def _pick(table: pd.DataFrame, benchmark: str | None, path: Path) -> pd.DataFrame:
    if benchmark is None:
        return table.reset_index(drop=True)
    known = sorted(table["benchmark"].unique())
    if benchmark not in known:
        raise ValueError(f"benchmark={benchmark!r} is not in {path.name}; it holds {known}")
    return table[table["benchmark"] == benchmark].reset_index(drop=True)


def relative_scores(relative: pd.DataFrame, reference: str = "gpt-3.5", n_boot: int = 1000, seed: int = 0,
                    drop_unparsed: bool = True) -> pd.DataFrame:
    """Each model's total score over both orders / the reference's (in %), per order, and a bootstrap ± over questions.

    Table 6 of the paper reports "% of ChatGPT" this way; its ± is a 95% interval. Ours resamples the questions
    (both orders of a question stay together) and gives half the width of the 2.5-97.5 percentile interval.
    `drop_unparsed` leaves out rows the judge's reply could not be parsed for (score -1 on both answers).
    """
    rows = relative.copy()
    if drop_unparsed:
        rows = rows[(rows["score_1"] != UNPARSED) & (rows["score_2"] != UNPARSED)]
    first = rows[rows["assistant_1"] == reference]
    second = rows[rows["assistant_2"] == reference]
    if first.empty and second.empty:
        raise ValueError(f"reference={reference!r} is in no row; assistants: {sorted(set(rows['assistant_1']))}")
    own = pd.concat([first.assign(model=first["assistant_2"], order="reference_first", mine=first["score_2"],
                                  ref=first["score_1"]),
                     second.assign(model=second["assistant_1"], order="model_first", mine=second["score_1"],
                                   ref=second["score_2"])])
    out = own.pivot_table(index="model", columns="order", values=["mine", "ref"], aggfunc="sum")
    table = pd.DataFrame({o: 100 * out[("mine", o)] / out[("ref", o)] for o in ("reference_first", "model_first")})
    per_q = own.pivot_table(index="question_id", columns="model", values=["mine", "ref"], aggfunc="sum").fillna(0)
    mine, ref = per_q["mine"].to_numpy(), per_q["ref"].to_numpy()
    table["score"] = pd.Series(100 * mine.sum(0) / ref.sum(0), index=per_q["mine"].columns)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(per_q), len(per_q)), minlength=len(per_q))
                       for _ in range(n_boot)])
    boot = 100 * (counts @ mine) / (counts @ ref)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    table["ci95"] = pd.Series((high - low) / 2, index=per_q["mine"].columns)
    return table.sort_values("score", ascending=False)


def encode(matches: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Models, index of assistant 1 and 2, and points for assistant 1; unparsable verdicts (-1) are left out."""
    missing = [c for c in ("assistant_1", "assistant_2", "winner") if c not in matches.columns]
    if missing:
        raise JudgmentFormatError(f"matches lack column(s) {missing}; found {list(matches.columns)}")
    bad = ~matches["winner"].isin(list(WINNER_CODES))
    if bad.any():
        raise JudgmentFormatError(f"winner={matches['winner'][bad].iloc[0]} is not one of {list(WINNER_CODES)}")
    played = matches[matches["winner"] != UNPARSED]
    if played.empty:
        raise ValueError("no usable matches: every verdict is missing or unparsable (-1)")
    names = np.concatenate([played["assistant_1"].to_numpy(str), played["assistant_2"].to_numpy(str)])
    models, index = np.unique(names, return_inverse=True)
    winner = played["winner"].to_numpy()
    points = np.select([winner == 1, winner == 2], [1.0, 0.0], 0.5)
    return list(models), index[:len(played)], index[len(played):], points


@dataclass
class EloResult:
    """Final Elo ratings after each random match order: `ratings[order, model]`."""

    models: list[str]
    ratings: np.ndarray

    def mean(self) -> pd.Series:
        """Average over orders, best first: the number the paper reports."""
        return pd.Series(self.ratings.mean(0), index=self.models).sort_values(ascending=False)

    def ci95(self) -> pd.Series:
        """The paper's ± : a 95% interval for the mean over orders (shrinks with more orders, not more data)."""
        return pd.Series(1.96 * self.ratings.std(0) / np.sqrt(len(self.ratings)), index=self.models)

    def spread(self) -> pd.Series:
        """Standard deviation over orders: how much one tournament's outcome depends on its match order."""
        return pd.Series(self.ratings.std(0), index=self.models)

    def ranks(self) -> pd.Series:
        """Rank by mean rating (1 = best)."""
        return pd.Series(range(1, len(self.models) + 1), index=self.mean().index)

    def same_ranking_share(self) -> float:
        """Share of single orders whose ranking equals the ranking of the mean."""
        best = np.argsort(-self.ratings.mean(0))
        return float((np.argsort(-self.ratings, axis=1) == best).all(1).mean())


def elo(matches: pd.DataFrame, k: float = 32.0, initial: float = 1000.0, orders: int | np.ndarray = 10_000,
        seed: int = 0, chunk: int = 2500) -> EloResult:
    """Elo as in the paper: start at `initial`, play every match in a random order with step K, for many orders.

    `orders` is a count of random orders, or an array whose rows are match orders (permutations of the usable
    matches) to replay exactly. All orders advance together, one numpy step per match: 10,000 take seconds.
    """
    if not k > 0:
        raise ValueError(f"k={k!r} is not allowed: a number > 0")
    models, a, b, s = encode(matches)
    done = []
    for plays in _match_orders(orders, len(a), seed, chunk):
        n = plays.shape[1]
        ratings = np.full(n * len(models), float(initial))
        base = np.arange(n) * len(models)  # ratings of all n orders in one flat array
        for step in plays:
            ia, ib = base + a[step], base + b[step]
            ra, rb = ratings[ia], ratings[ib]
            change = k * (s[step] - 1 / (1 + 10 ** ((rb - ra) / 400)))
            ratings[ia], ratings[ib] = ra + change, rb - change
        done.append(ratings.reshape(n, len(models)))
    return EloResult(models, np.concatenate(done))


def _match_orders(orders: int | np.ndarray, n_matches: int, seed: int, chunk: int):
    """Blocks of match orders, one column per order (step t of every order is one contiguous row)."""
    if isinstance(orders, np.ndarray):
        if orders.ndim != 2 or orders.shape[1] != n_matches or \
                not (np.sort(orders, axis=1) == np.arange(n_matches)).all():
            raise ValueError(f"orders of shape {orders.shape} are not permutations of the {n_matches} usable matches")
        yield orders.T
        return
    if not (isinstance(orders, (int, np.integer)) and orders >= 1):
        raise ValueError(f"orders={orders!r} is not allowed: a whole number >= 1, or an array of permutations")
    rng = np.random.default_rng(seed)
    for start in range(0, orders, chunk):
        block = np.tile(np.arange(n_matches, dtype=np.int32)[:, None], (1, min(chunk, orders - start)))
        yield rng.permuted(block, axis=0)


def bradley_terry(matches: pd.DataFrame, initial: float = 1000.0, ridge: float = 1e-6) -> pd.Series:
    """Order-free ratings: maximum likelihood of P(i beats j) = 1 / (1 + 10^((R_j - R_i)/400)), ties = half a win.

    Reported on the Elo scale (mean = `initial`). `ridge` (a tiny L2 pull to the mean) keeps a model that won
    every match finite; on real data it moves ratings by far less than one point.
    """
    models, a, b, s = encode(matches)
    theta = _bt_fit(len(models), a, b, s, ridge)
    return pd.Series(initial + 400 / np.log(10) * theta, index=models).sort_values(ascending=False)


def _bt_fit(n: int, a: np.ndarray, b: np.ndarray, s: np.ndarray, ridge: float) -> np.ndarray:
    """Bradley-Terry strengths (natural-log scale, mean 0) by Newton trust-region steps on the exact Hessian."""
    from scipy.optimize import minimize

    wins = np.zeros((n, n))  # wins[i, j]: points i took from j
    np.add.at(wins, (a, b), s)
    np.add.at(wins, (b, a), 1 - s)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        log_p = -np.logaddexp(0, theta[None, :] - theta[:, None])  # log sigmoid(theta_i - theta_j)
        miss = wins * -np.expm1(log_p)  # wins weighted by 1 - p
        return -(wins * log_p).sum() + ridge * theta @ theta, miss.sum(0) - miss.sum(1) + 2 * ridge * theta

    def hessian(theta: np.ndarray) -> np.ndarray:
        p = 1 / (1 + np.exp(theta[None, :] - theta[:, None]))
        w = (wins + wins.T) * p * (1 - p)
        return np.diag(w.sum(1)) - w + 2 * ridge * np.eye(n)

    fit = minimize(loss, np.zeros(n), jac=True, hess=hessian, method="trust-exact")
    return fit.x - fit.x.mean()


def order_bias(matches: pd.DataFrame) -> pd.DataFrame:
    """Per pairing and overall: verdicts for the answer shown first vs second, ties, and order-consistency.

    `first_share` = first / (first + second) among decisive verdicts (0.5 = no bias). `consistent` = share of
    questions judged in both orders where the verdict names the same model (or a tie) both times.
    """
    played = matches[matches["winner"] != UNPARSED].copy()
    played["pairing"] = [" vs ".join(sorted(p)) for p in zip(played["assistant_1"], played["assistant_2"])]
    played["verdict"] = np.select([played["winner"] == 1, played["winner"] == 2],
                                  [played["assistant_1"], played["assistant_2"]], "tie")
    both = played.merge(played, left_on=["question_id", "assistant_1", "assistant_2"],
                        right_on=["question_id", "assistant_2", "assistant_1"], suffixes=("", "_swapped"))
    both["consistent"] = both["verdict"] == both["verdict_swapped"]

    def summary(group: pd.DataFrame, pairs: pd.DataFrame) -> dict:
        first, second = int((group["winner"] == 1).sum()), int((group["winner"] == 2).sum())
        return {"n": len(group), "first": first, "second": second, "ties": len(group) - first - second,
                "first_share": first / max(first + second, 1),
                "consistent": pairs["consistent"].mean() if len(pairs) else np.nan}

    table = {name: summary(g, both[both["pairing"] == name]) for name, g in played.groupby("pairing")}
    table["all pairings"] = summary(played, both)
    return pd.DataFrame(table).T.astype({"n": int, "first": int, "second": int, "ties": int})


def one_order(matches: pd.DataFrame, first: Sequence[str]) -> pd.DataFrame:
    """Only the rows a single-order evaluation would have: of each pairing, the model earlier in `first` shown first."""
    rank = {m: i for i, m in enumerate(first)}
    unknown = sorted((set(matches["assistant_1"]) | set(matches["assistant_2"])) - set(rank))
    if unknown:
        raise ValueError(f"models {unknown} are not in first={list(first)}")
    return matches[matches["assistant_1"].map(rank) < matches["assistant_2"].map(rank)]


def rank_stability(matches: pd.DataFrame, sizes: Sequence[int], repeats: int = 50, seed: int = 0) -> pd.DataFrame:
    """Kendall's tau between Bradley-Terry ranks on `size` random questions and on all of them, `repeats` times."""
    from scipy.stats import kendalltau

    models, a, b, s = encode(matches)
    questions, asked = np.unique(matches.loc[matches["winner"] != UNPARSED, "question_id"].to_numpy(str),
                                 return_inverse=True)
    full = _bt_fit(len(models), a, b, s, 1e-6)
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        if not 1 <= size <= len(questions):
            raise ValueError(f"size={size} is not allowed: 1..{len(questions)} (the questions in the matches)")
        for r in range(repeats):
            keep = np.isin(asked, rng.choice(len(questions), size, replace=False))
            sub = _bt_fit(len(models), a[keep], b[keep], s[keep], 1e-6)
            rows.append({"size": size, "repeat": r, "tau": kendalltau(full, sub).statistic,
                         "same_top": sub.argmax() == full.argmax()})
    return pd.DataFrame(rows)


def tournament(answers: dict[str, Sequence[str]], judge: Judge, both_orders: bool = True,
               benchmark: str = "ours") -> pd.DataFrame:
    """Every pairing of models on every question, in both presentation orders, judged in one batch."""
    lengths = {m: len(v) for m, v in answers.items()}
    if len(answers) < 2 or len(set(lengths.values())) != 1:
        raise ValueError(f"answers needs >= 2 models with one answer per question each; got lengths {lengths}")
    keys = []
    for x, y in combinations(list(answers), 2):
        for q in range(lengths[x]):
            keys += [(q, x, y)] + ([(q, y, x)] if both_orders else [])
    verdicts = list(judge([(q, answers[x][q], answers[y][q]) for q, x, y in keys]))
    bad = [v for v in verdicts if v not in WINNER_CODES]
    if len(verdicts) != len(keys) or bad:
        raise ValueError(f"the judge must return one of {list(WINNER_CODES)} per pair; got {len(verdicts)} "
                         f"verdicts for {len(keys)} pairs, bad values {bad[:3]}")
    return pd.DataFrame([{"benchmark": benchmark, "question_id": q, "assistant_1": x, "assistant_2": y,
                          "winner": int(v)} for (q, x, y), v in zip(keys, verdicts)])


def token_f1(reply: str, reference: str) -> float:
    """Word-overlap F1 with a reference answer (SQuAD-style): all that a reference-based proxy judge can see."""
    got, want = Counter(re.findall(r"\w+", reply.lower())), Counter(re.findall(r"\w+", reference.lower()))
    common = sum((got & want).values())
    return 0.0 if not common else 2 * common / (sum(got.values()) + sum(want.values()))


def reference_judge(references: Sequence[str], margin: float = 0.02) -> Judge:
    """A proxy judge: the answer with the higher token F1 against the human reference wins; within `margin`, a tie."""
    def verdict(q: int, one: str, two: str) -> int:
        gap = token_f1(one, references[q]) - token_f1(two, references[q])
        return 3 if abs(gap) < margin else 1 if gap > 0 else 2

    return lambda items: [verdict(*item) for item in items]


#: What the LLM judge is asked (our wording; the paper's GPT-4 prompt also asked for an explanation first).
JUDGE_PROMPT = ("Question: {question}\n\nAnswer 1: {one}\n\nAnswer 2: {two}\n\n"
                "Which answer is more helpful and correct? Reply with 1 or 2.")


def lm_judge(model, tokenizer, questions: Sequence[str], batch_size: int = 8) -> Judge:
    """An LLM as judge, as the paper used GPT-4: ask which answer is better and compare P('1') with P('2')."""
    import torch

    choices = [tokenizer.convert_tokens_to_ids(t) for t in ("1", "2")]

    @torch.no_grad()
    def judge(items: Sequence[tuple[int, str, str]]) -> list[int]:
        texts = [tokenizer.apply_chat_template(
            [{"role": "user", "content": JUDGE_PROMPT.format(question=questions[q], one=x, two=y)}],
            tokenize=False, add_generation_prompt=True) for q, x, y in items]
        side, tokenizer.padding_side, out = tokenizer.padding_side, "left", []
        try:
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True)
                logits = model(**batch.to(model.device), logits_to_keep=1).logits[:, -1, choices]
                out += [1 if one >= two else 2 for one, two in logits.tolist()]
        finally:
            tokenizer.padding_side = side
        return out

    return judge


class Ballot:
    """Anonymous answer pairs for a person to judge; their votes become matches for `elo`."""

    def __init__(self, questions: Sequence[str], answers: dict[str, Sequence[str]], n_pairs: int = 6, seed: int = 0):
        rng = np.random.default_rng(seed)
        pairs = [(q, x, y) for x, y in combinations(list(answers), 2) for q in range(len(questions))]
        chosen = rng.choice(len(pairs), min(n_pairs, len(pairs)), replace=False)
        self.pairs = [pairs[i] if rng.random() < 0.5 else (pairs[i][0], pairs[i][2], pairs[i][1]) for i in chosen]
        self.questions, self.answers, self.votes = list(questions), answers, {}

    def html(self) -> str:
        """The pairs side by side, as an HTML table (model names hidden)."""
        cell = lambda t: f"<td style='vertical-align:top;text-align:left;white-space:pre-wrap'>{html.escape(t)}</td>"
        rows = "".join(f"<tr><td>{i}</td>{cell(self.questions[q])}{cell(self.answers[x][q])}"
                       f"{cell(self.answers[y][q])}</tr>" for i, (q, x, y) in enumerate(self.pairs, 1))
        return (f"<table><tr><th>#</th><th>question</th><th>answer 1</th><th>answer 2</th></tr>{rows}</table>")

    def vote(self, choices: str) -> None:
        """Record votes for pairs 1, 2, ... in order: '1' or '2' for the better answer, 't' for a tie."""
        codes = {"1": 1, "2": 2, "t": 3}
        bad = [c for c in choices if c not in codes]
        if bad or len(choices) > len(self.pairs):
            raise ValueError(f"choices={choices!r}: use one of '1', '2', 't' per pair, at most {len(self.pairs)}")
        self.votes = {i: codes[c] for i, c in enumerate(choices)}

    def judge_with(self, judge: Judge) -> None:
        """Let a judge vote instead of a person (what a headless run does)."""
        self.votes = dict(enumerate(int(v) for v in judge([(q, self.answers[x][q], self.answers[y][q])
                                                           for q, x, y in self.pairs])))

    def matches(self) -> pd.DataFrame:
        """The voted pairs in the tournament's format (model names revealed)."""
        return pd.DataFrame([{"benchmark": "you", "question_id": self.pairs[i][0], "assistant_1": self.pairs[i][1],
                              "assistant_2": self.pairs[i][2], "winner": v} for i, v in self.votes.items()],
                            columns=list(PAIRWISE_COLUMNS))
