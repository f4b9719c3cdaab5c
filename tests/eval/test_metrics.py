import numpy as np
import pytest

from megacpt.eval.metrics import bootstrap_ci, entity_counts, entity_f1, weighted_f1


@pytest.mark.parametrize("seed", range(6))
def test_weighted_f1_matches_sklearn(seed):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    labels = ["negative", "neutral", "positive", "other"][: 2 + seed % 3]
    n = int(rng.integers(1, 40))
    gold = list(rng.choice(labels, n))
    # skewed predictions so some classes are never predicted / never gold
    pred = list(rng.choice(labels[:-1] if seed % 2 else labels, n))
    for lab in (None, labels):
        ours = weighted_f1(gold, pred, lab)
        ref = f1_score(gold, pred, labels=lab, average="weighted", zero_division=0)
        assert ours == pytest.approx(ref, abs=1e-12)


def test_weighted_f1_edge_cases():
    assert weighted_f1(["a", "a"], ["a", "a"]) == 1.0
    assert weighted_f1(["a", "b"], ["b", "a"]) == 0.0
    # hand-computed: class a F1 = 2*1/(2+1) = 2/3 (support 2), class b F1 = 2*1/(1+2) = 2/3 (support 1)
    assert weighted_f1(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        weighted_f1(["a"], [])


def test_entity_f1_hand_checked():
    gold = [[("Acme Holdings Inc", "ORG"), ("John Smith", "PER")], [], [("London", "LOC")]]
    # exact match (modulo case/whitespace) counts; wrong type and partial span do not
    pred = [[("acme  holdings inc", "ORG"), ("John", "PER")], [("Bob", "PER")], [("London", "ORG")]]
    assert entity_counts(gold, pred) == (1, 3, 4)  # tp, gold entities, predicted entities
    assert entity_f1(gold, pred) == pytest.approx(2 * 1 / 7)
    assert entity_f1(gold, gold) == 1.0
    assert entity_f1([[]], [[]]) == 1.0
    assert entity_f1(gold, [[], [], []]) == 0.0
    # a duplicate prediction of a single gold entity: 1 tp, 1 fp -> P=1/2, R=1, F1=2/3
    assert entity_f1([[("X", "PER")]], [[("X", "PER"), ("X", "PER")]]) == pytest.approx(2 / 3)


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    x = np.random.default_rng(0).normal(1.0, 1.0, 200)
    ci = bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), n_boot=300, seed=3)
    assert ci == bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), n_boot=300, seed=3)
    assert ci[0] < x.mean() < ci[1]
    assert ci[1] - ci[0] == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.3)
