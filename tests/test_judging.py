"""qlora_lab.judging: loaders, "% of ChatGPT", Elo, Bradley-Terry and order bias on hand-made and shipped tournaments."""

import numpy as np
import pandas as pd
import pytest

from qlora_lab import judging


def matches(rows, question_ids=None):
    """A tournament from (assistant_1, assistant_2, winner) triples."""
    table = pd.DataFrame(rows, columns=["assistant_1", "assistant_2", "winner"])
    table["question_id"] = question_ids if question_ids is not None else range(len(table))
    return table


def both_orders(pairs):
    """Each (winner_model, loser_model, n) judged n times in both presentation orders."""
    rows = []
    for x, y, n in pairs:
        rows += [(x, y, 1), (y, x, 2)] * n
    return matches(rows)


# ------------------------------------------------------------------------------------------ loaders
def test_loaders_read_the_shipped_data():
    pairwise = judging.load_pairwise()
    assert len(pairwise) == 44_506 and set(pairwise["benchmark"]) == {"vicuna", "oa"}
    assert set(pairwise["winner"]) == {1, 2, 3, -1}
    vicuna = judging.load_pairwise(benchmark="vicuna")
    assert len(vicuna) == 4480 and vicuna["question_id"].nunique() == 80
    relative = judging.load_relative()
    assert len(relative) == 5760 and relative["score_1"].between(-1, 10).all()


def test_loader_names_missing_columns(tmp_path):
    bad = tmp_path / "j.csv"
    bad.write_text("benchmark,question_id,assistant_1,winner\nvicuna,1,a,1\n")
    with pytest.raises(judging.JudgmentFormatError, match=r"j.csv lacks column\(s\) \['assistant_2'\]"):
        judging.load_pairwise(bad)
    with pytest.raises(judging.JudgmentFormatError, match="No judgments file"):
        judging.load_pairwise(tmp_path / "nope.csv")


def test_loader_names_file_line_and_bad_winner(tmp_path):
    bad = tmp_path / "j.csv"
    bad.write_text("benchmark,question_id,assistant_1,assistant_2,winner\n"
                   "vicuna,1,a,b,1\nvicuna,2,a,b,3\nvicuna,3,a,b,0\n")
    with pytest.raises(judging.JudgmentFormatError, match=r"j.csv line 4: winner='0' is not allowed.*1, 2, 3, -1"):
        judging.load_pairwise(bad)
    bad.write_text("benchmark,question_id,assistant_1,assistant_2,winner\nvicuna,1,a,b,tie\n")
    with pytest.raises(judging.JudgmentFormatError, match=r"line 2: winner='tie'"):
        judging.load_pairwise(bad)


def test_loader_checks_scores_and_benchmark(tmp_path):
    bad = tmp_path / "r.csv"
    bad.write_text("benchmark,question_id,assistant_1,assistant_2,score_1,score_2\nvicuna,1,a,b,8,11\n")
    with pytest.raises(judging.JudgmentFormatError, match=r"r.csv line 2: score_2='11'.*0 to 10, or -1"):
        judging.load_relative(bad)
    with pytest.raises(ValueError, match=r"benchmark='mmlu'.*\['oa', 'vicuna'\]"):
        judging.load_pairwise(benchmark="mmlu")


# ----------------------------------------------------------------------------------- % of ChatGPT
def test_relative_scores_by_hand():
    rel = pd.DataFrame({"question_id": [1, 1, 2, 2], "assistant_1": ["ref", "m", "ref", "m"],
                        "assistant_2": ["m", "ref", "m", "ref"], "score_1": [8.0, 6, 10, -1],
                        "score_2": [4.0, 8, 5, -1]})
    kept = judging.relative_scores(rel, reference="ref", n_boot=50, drop_unparsed=False).loc["m"]
    assert kept["score"] == pytest.approx(100 * (4 + 6 + 5 - 1) / (8 + 8 + 10 - 1))
    assert kept["reference_first"] == pytest.approx(100 * 9 / 18)
    dropped = judging.relative_scores(rel, reference="ref", n_boot=50).loc["m"]
    assert dropped["score"] == pytest.approx(100 * 15 / 26)
    assert dropped["model_first"] == pytest.approx(100 * 6 / 8)
    with pytest.raises(ValueError, match="reference='gpt'"):
        judging.relative_scores(rel, reference="gpt")


def test_relative_scores_equal_the_papers_guanaco_figures():
    table = judging.relative_scores(judging.load_relative(), n_boot=200)
    paper = {"65b-guanaco": 99.3, "30b-guanaco": 97.8, "13b-guanaco": 90.4, "7b-guanaco": 87.0}  # Table 6
    for model, figure in paper.items():
        assert round(table.loc[model, "score"], 1) == figure, model
    assert len(table) == 36
    assert (table["ci95"] > 1).all() and (table["ci95"] < 10).all()
    # The judge favours the answer it reads first: every model scores higher when shown first.
    assert (table["model_first"] > table["reference_first"]).all()


# -------------------------------------------------------------------------------------------- Elo
def test_elo_one_match_by_hand():
    result = judging.elo(matches([("a", "b", 1)]), k=32, initial=1000, orders=1)
    assert result.mean().to_dict() == {"a": 1016.0, "b": 984.0}
    result = judging.elo(matches([("a", "b", 3)]), orders=3)
    assert result.mean().to_dict() == {"a": 1000.0, "b": 1000.0}


def test_elo_transitive_tournament_ranks_and_is_zero_sum():
    games = both_orders([("a", "b", 3), ("b", "c", 3), ("a", "c", 3)])
    result = judging.elo(games, orders=200, seed=1)
    assert list(result.mean().index) == ["a", "b", "c"]
    assert result.ratings.sum(1) == pytest.approx(np.full(200, 3000.0))
    assert list(judging.bradley_terry(games.iloc[:-2]).index) == ["a", "b", "c"]


def test_elo_ties_pull_together_and_unparsable_verdicts_are_skipped():
    decisive = both_orders([("a", "b", 4)])
    with_ties = pd.concat([decisive, matches([("a", "b", 3), ("b", "a", 3)] * 4)], ignore_index=True)
    gap = lambda r: r.mean()["a"] - r.mean()["b"]
    assert 0 < gap(judging.elo(with_ties, orders=100)) < gap(judging.elo(decisive, orders=100))
    noisy = pd.concat([decisive, matches([("b", "a", -1)] * 5)], ignore_index=True)
    assert judging.elo(noisy, orders=50, seed=3).mean().to_dict() == judging.elo(decisive, orders=50, seed=3).mean().to_dict()
    with pytest.raises(ValueError, match="no usable matches"):
        judging.elo(matches([("a", "b", -1)]))


def test_elo_depends_on_match_order_but_bradley_terry_does_not():
    # b beats a twice, then a beats b twice: the last results weigh most in Elo.
    games = matches([("b", "a", 1), ("b", "a", 1), ("a", "b", 1), ("a", "b", 1)])
    one = judging.elo(games, orders=1, seed=0).ratings[0]
    spread = judging.elo(games, orders=500, seed=0).spread()
    assert spread["a"] > 1 and spread["a"] == pytest.approx(spread["b"])
    ratings = judging.elo(games, orders=500, seed=0).ratings
    assert ratings[:, 0].min() < 1000 < ratings[:, 0].max() and one.sum() == pytest.approx(2000)
    bt = judging.bradley_terry(games)
    assert bt["a"] == pytest.approx(bt["b"]) and bt["a"] == pytest.approx(1000)
    assert judging.bradley_terry(games.iloc[::-1]).to_dict() == pytest.approx(bt.to_dict())


def test_elo_rejects_bad_arguments():
    games = matches([("a", "b", 1)])
    with pytest.raises(ValueError, match="orders=0"):
        judging.elo(games, orders=0)
    with pytest.raises(ValueError, match="k=-1"):
        judging.elo(games, k=-1)
    with pytest.raises(judging.JudgmentFormatError, match="winner=7"):
        judging.elo(matches([("a", "b", 7)]))
    with pytest.raises(ValueError, match="not permutations of the 2 usable matches"):
        judging.elo(matches([("a", "b", 1), ("b", "a", 1)]), orders=np.array([[0, 0]]))


def test_elo_replays_given_orders_exactly():
    games = matches([("a", "b", 1), ("b", "c", 3), ("c", "a", 2)])
    orders = np.array([[0, 1, 2], [2, 1, 0]])
    result = judging.elo(games, orders=orders)
    for row, order in zip(result.ratings, orders):  # by hand, one order at a time
        rating = {"a": 1000.0, "b": 1000.0, "c": 1000.0}
        for i in order:
            x, y, w = games.iloc[i][["assistant_1", "assistant_2", "winner"]]
            change = 32 * ({1: 1.0, 2: 0.0, 3: 0.5}[w] - 1 / (1 + 10 ** ((rating[y] - rating[x]) / 400)))
            rating[x], rating[y] = rating[x] + change, rating[y] - change
        assert row == pytest.approx([rating[m] for m in result.models])


def test_bradley_terry_recovers_known_strengths():
    rng = np.random.default_rng(0)
    true = {"a": 1200.0, "b": 1000.0, "c": 800.0}
    rows = []
    for x, y in [("a", "b"), ("b", "c"), ("a", "c"), ("b", "a"), ("c", "b"), ("c", "a")]:
        p = 1 / (1 + 10 ** ((true[y] - true[x]) / 400))
        rows += [(x, y, 1 if rng.random() < p else 2) for _ in range(3000)]
    fit = judging.bradley_terry(matches(rows))
    for model, rating in true.items():
        assert fit[model] == pytest.approx(rating, abs=15)


# ------------------------------------------------------------------------------------- order bias
def test_order_bias_when_order_matters():
    # The judge always picks the answer shown first: 100% first, 0% consistent.
    biased = matches([("a", "b", 1), ("b", "a", 1)] * 5, question_ids=[q for q in range(5) for _ in (0, 1)])
    table = judging.order_bias(biased)
    row = table.loc["all pairings"]
    assert row["first_share"] == 1.0 and row["consistent"] == 0.0 and row["n"] == 10
    fair = matches([("a", "b", 1), ("b", "a", 2)] * 5, question_ids=[q for q in range(5) for _ in (0, 1)])
    row = judging.order_bias(fair).loc["a vs b"]
    assert row["first_share"] == 0.5 and row["consistent"] == 1.0
    only = judging.one_order(biased, ["a", "b"])
    assert set(only["assistant_1"]) == {"a"} and len(only) == 5
    assert list(judging.elo(only, orders=10).mean().index) == ["a", "b"]


def test_shipped_vicuna_elo_ranks_equal_the_papers():
    vicuna = judging.load_pairwise(benchmark="vicuna")
    result = judging.elo(vicuna, orders=2000, seed=0)
    # Table 1 / Table 7 (GPT-4 judge, Vicuna benchmark), best first.
    paper = ["gpt4", "65b-guanaco", "30b-guanaco", "vicuna-13b", "gpt35", "13b-guanaco", "bard", "7b-guanaco"]
    assert list(result.mean().index) == paper
    assert list(judging.bradley_terry(vicuna).index) == paper
    assert result.mean()["65b-guanaco"] == pytest.approx(1022, abs=3)
    bias = judging.order_bias(vicuna).loc["all pairings"]
    assert 0.6 < bias["first_share"] < 0.7


def test_rank_stability_grows_with_questions():
    vicuna = judging.load_pairwise(benchmark="vicuna")
    curve = judging.rank_stability(vicuna, [5, 80], repeats=5).groupby("size")["tau"].mean()
    assert curve[80] == pytest.approx(1.0) and curve[5] < 0.9
    with pytest.raises(ValueError, match="size=81"):
        judging.rank_stability(vicuna, [81], repeats=1)


# -------------------------------------------------------------------------- our tournaments and votes
def test_tournament_with_reference_judge_and_ballot():
    references = ["the cat sat on the mat", "water boils at one hundred degrees"]
    answers = {"good": ["the cat sat on a mat", "water boils at 100 degrees"],
               "bad": ["dogs bark", "ice is cold"], "same": ["dogs bark", "ice is cold"]}
    games = judging.tournament(answers, judging.reference_judge(references))
    assert len(games) == 3 * 2 * 2 and set(games["winner"]) <= {1, 2, 3}
    assert judging.order_bias(games).loc["all pairings", "consistent"] == 1.0
    assert judging.bradley_terry(games).index[0] == "good"
    assert games.query("assistant_1 == 'bad' and assistant_2 == 'same'")["winner"].tolist() == [3, 3]
    assert judging.token_f1("a b", "a b") == 1.0 and judging.token_f1("x", "a b") == 0.0
    with pytest.raises(ValueError, match="one answer per question"):
        judging.tournament({"a": ["x"], "b": []}, judging.reference_judge(references))
    ballot = judging.Ballot(["q1", "q2"], answers, n_pairs=3, seed=0)
    assert "<table>" in ballot.html() and "good" not in ballot.html()
    ballot.vote("1t")
    votes = ballot.matches()
    assert list(votes["winner"]) == [1, 3] and set(votes.columns) >= {"assistant_1", "assistant_2"}
    with pytest.raises(ValueError, match="choices='1x'"):
        ballot.vote("1x")
    ballot.judge_with(judging.reference_judge(references))
    assert len(ballot.matches()) == 3 and set(ballot.matches()["winner"]) <= {1, 2, 3}


def test_lm_judge_reads_both_orders_with_the_embedded_model():
    from qlora_lab import models

    model, tokenizer = models.load_model(compute_dtype=__import__("torch").float32), models.load_tokenizer()
    side = tokenizer.padding_side
    judge = judging.lm_judge(model, tokenizer, ["What is the capital of France?"], batch_size=1)
    verdicts = judge([(0, "Paris.", "I like turtles."), (0, "I like turtles.", "Paris.")])
    assert len(verdicts) == 2 and set(verdicts) <= {1, 2}
    assert judge([(0, "I like turtles.", "Paris."), (0, "Paris.", "I like turtles.")]) == verdicts[::-1]  # batching-free
    assert tokenizer.padding_side == side
    assert "Answer 2: Paris." in judging.JUDGE_PROMPT.format(question="q", one="x", two="Paris.")
