"""The demo's retelling score: ROUGE-L F1 against the tale's opening (no model needed)."""
from kvmap.demo import retell_score


TALE = {"title": "The Test Tale", "text": " ".join(f"word{i}" for i in range(400))}


def test_the_opening_itself_scores_one():
    assert retell_score(" ".join(f"word{i}" for i in range(150)), TALE) == 1.0


def test_only_the_opening_counts():
    # the tale's words from after the opening share nothing with the reference
    assert retell_score(" ".join(f"word{i}" for i in range(200, 350)), TALE) == 0.0


def test_a_partial_retelling_scores_between():
    score = retell_score(" ".join(f"word{i}" for i in range(0, 150, 2)), TALE)
    assert 0.5 < score < 0.8  # recall 0.5, precision 1
