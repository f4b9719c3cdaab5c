import itertools
import json
import os

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.data.indexed import IndexedDataset, IndexedDatasetWriter, read_sidecar, write_sidecar
from megacpt.errors import UserError
from megacpt.selection.combine import Metric, combined_score, parse_weights, percentile_rank
from megacpt.data.identity import dataset_identity
from megacpt.selection.sample import Budget, soft_order, take_budget
from megacpt.score.files import score_metadata, write_scores
from megacpt.selection.select import SelectConfig, compute_selection, replay, select


def _score_file(path, prefix, metric, column, values, extra=None, with_meta=True):
    n = len(values)
    cols = {"doc_id": np.arange(n, dtype=np.int64), column: np.asarray(values, dtype=np.float64), **(extra or {})}
    meta = score_metadata(metric, column, dataset_identity(prefix), {}) if with_meta else {}
    write_scores(path, cols, meta)
    return str(path)


@pytest.fixture()
def corpus(tmp_path):
    """30 documents of varied length (doc 7 empty), token ids = doc id; no tokenizer needed to select."""
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "c")
    lengths = rng.integers(5, 60, size=30)
    lengths[7] = 0
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d, n in enumerate(lengths):
            w.add_document([np.full(n, d)] if n else [])
    write_sidecar(prefix, {"tokenizer": {"type": "fake", "sha256": "abc", "eod": 0}, "dtype": "uint16"})
    return prefix, lengths


def _outputs(prefix):
    return [p for p in (prefix + s for s in (".bin", ".idx", ".meta.json", ".manifest.json"))
            if os.path.exists(p)]


def test_percentile_rank_ties_and_undefined():
    np.testing.assert_allclose(percentile_rank(np.array([3.0, 1.0, 2.0, 2.0])), [0.875, 0.125, 0.5, 0.5])
    r = percentile_rank(np.array([5.0, np.nan, 1.0]), np.array([False, True, False]))
    assert r[1] < r[2] < r[0]


def test_combined_ranking_hand_example():
    n = np.zeros(4, bool)
    m = {"sim": Metric("sim", np.array([4.0, 3, 2, 1]), n, "a"), "ent": Metric("ent", np.array([1.0, 2, 3, 40]), n, "b")}
    np.testing.assert_allclose(combined_score(m, {"sim": 1, "ent": 1}), [0.5] * 4)
    np.testing.assert_allclose(combined_score(m, {"sim": 3, "ent": 1}), [0.6875, 0.5625, 0.4375, 0.3125])
    assert parse_weights("sim=3, ent=1") == {"sim": 3.0, "ent": 1.0}
    for bad in ("sim", "foo=1", "sim=x", "sim=-1", "sim=0"):
        with pytest.raises(UserError, match="--weights"):
            parse_weights(bad)


def test_take_budget_within_one_document():
    rng = np.random.default_rng(1)
    for _ in range(200):
        lengths = rng.integers(1, 100, size=50)
        order = rng.permutation(50)
        budget = int(rng.integers(1, lengths.sum() + 1))
        got = take_budget(order, lengths, "tokens", budget)
        tot = lengths[got].sum()
        assert tot >= budget and tot - lengths[got[-1]] < budget
        assert np.array_equal(got, order[: got.size])
    assert take_budget(np.arange(5), np.ones(5), "docs", 3).tolist() == [0, 1, 2]


def test_hard_selection_takes_top_scores_to_budget(tmp_path, corpus):
    prefix, lengths = corpus
    sim = np.arange(30, dtype=float)  # higher doc id = more similar
    f = _score_file(tmp_path / "sim.parquet", prefix, "similarity", "similarity", sim)
    budget = int(0.25 * lengths.sum())
    m = select(SelectConfig(prefix, str(tmp_path / "out"), "ets", [f], budget=Budget("tokens", budget)))
    ids = m["selected_doc_ids"]
    top = sorted(ids)[0]
    assert ids == list(range(top, 30))  # a contiguous top of the ranking
    achieved = m["budget"]["achieved_tokens"]
    assert achieved == lengths[ids].sum() and budget <= achieved < budget + lengths[top]
    out = IndexedDataset(tmp_path / "out")
    assert out.num_documents == len(ids) and out.dtype == np.uint16
    for j, d in enumerate(ids):
        assert out.document(j).tolist() == [d] * lengths[d]
    side = read_sidecar(tmp_path / "out")
    assert side["tokenizer"] == {"type": "fake", "sha256": "abc", "eod": 0} and side["num_tokens"] == achieved


def test_soft_sampling_seeded_and_excludes_empty(tmp_path, corpus):
    prefix, lengths = corpus
    f = _score_file(tmp_path / "ent.parquet", prefix, "pos-entropy", "pos_entropy", np.linspace(0, 3, 30))
    cfg = lambda seed, out: SelectConfig(prefix, str(tmp_path / out), "eta-ent", [f], sampling="soft",
                                         budget=Budget("fraction", 0.3), seed=seed)
    a, _ = compute_selection(cfg(1, "a"))
    b, _ = compute_selection(cfg(1, "b"))
    c, info = compute_selection(cfg(2, "c"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 7 not in a and info["excluded_empty_documents"] == 1


def test_soft_first_draw_follows_weights():
    w = np.array([0.1, 0.2, 0.3, 0.4])
    n = 20000
    first = np.bincount([soft_order(w, 1.0, s, weighting="power")[0] for s in range(n)], minlength=4) / n
    np.testing.assert_allclose(first, w / w.sum(), atol=0.015)
    # temperature flattens: T=2 -> weights sqrt(w)
    first = np.bincount([soft_order(w, 2.0, s, weighting="power")[0] for s in range(n)], minlength=4) / n
    np.testing.assert_allclose(first, np.sqrt(w) / np.sqrt(w).sum(), atol=0.015)


def test_soft_inclusion_matches_sequential_sampling_law():
    w = np.array([0.05, 0.15, 0.3, 0.5, 0.8])
    k, n = 2, 20000
    exact = np.zeros(5)
    for i, j in itertools.permutations(range(5), 2):  # P(first=i, second=j)
        p = w[i] / w.sum() * w[j] / (w.sum() - w[i])
        exact[[i, j]] += p
    freq = np.zeros(5)
    for s in range(n):
        freq[soft_order(w, 1.0, s, weighting="power")[:k]] += 1
    np.testing.assert_allclose(freq / n, exact, atol=0.015)


def test_random_and_full_baselines(tmp_path, corpus):
    prefix, lengths = corpus
    r1 = select(SelectConfig(prefix, str(tmp_path / "r1"), "random", budget=Budget("fraction", 0.5), seed=3))
    r2, _ = compute_selection(SelectConfig(prefix, str(tmp_path / "r2"), "random", budget=Budget("fraction", 0.5), seed=3))
    assert r1["selected_doc_ids"] == r2.tolist() and r1["sampling"] == "uniform"
    need = int(np.ceil(0.5 * lengths.sum()))
    assert need <= r1["budget"]["achieved_tokens"] < need + lengths.max()
    full = select(SelectConfig(prefix, str(tmp_path / "full"), "full"))
    assert full["selected_doc_ids"] == [d for d in range(30) if d != 7]
    assert full["budget"]["achieved_tokens"] == lengths.sum()
    # random inclusion is uniform over documents (by count) across seeds, when the budget is in docs
    freq = np.zeros(30)
    for s in range(400):
        ids, _ = compute_selection(SelectConfig(prefix, "x", "random", budget=Budget("docs", 10), seed=s))
        freq[ids] += 1
    assert freq[7] == 0 and np.allclose(np.delete(freq, 7) / 400, 10 / 29, atol=0.1)


def test_perplexity_scores_with_empty_docs(tmp_path, corpus):
    prefix, lengths = corpus
    nll = np.linspace(1, 4, 30)
    n_pred = np.maximum(lengths - 1, 0)
    n_pred[3] = 0
    nll[[3, 7]] = np.nan  # n_pred = 0: undefined -> ranks last
    f = _score_file(tmp_path / "ppl.parquet", prefix, "perplexity", "nll_mean", nll,
                    {"n_pred": n_pred.astype(np.int64), "nll_sum": np.nan_to_num(nll) * n_pred}, with_meta=False)
    ids, _ = compute_selection(SelectConfig(prefix, "x", "eta-ppl", [f], budget=Budget("docs", 29)))
    assert 3 in ids  # all selectable docs
    ids, _ = compute_selection(SelectConfig(prefix, "x", "eta-ppl", [f], budget=Budget("docs", 28)))
    assert 3 not in ids and 7 not in ids


def test_combined_strategy(tmp_path, corpus):
    prefix, _ = corpus
    fs = _score_file(tmp_path / "s.parquet", prefix, "similarity", "similarity", np.arange(30.0))
    fe = _score_file(tmp_path / "e.parquet", prefix, "pos-entropy", "pos_entropy", np.arange(30.0)[::-1] ** 2)
    args = dict(budget=Budget("docs", 5))
    eq, info = compute_selection(SelectConfig(prefix, "x", "combined", [fs, fe], **args))
    assert info["weights"] == {"sim": 1.0, "ent": 1.0}
    sim_only, _ = compute_selection(SelectConfig(prefix, "x", "combined", [fs, fe], weights={"sim": 1.0}, **args))
    assert sim_only.tolist() == [25, 26, 27, 28, 29]
    ent_heavy, _ = compute_selection(SelectConfig(prefix, "x", "combined", [fs, fe], weights={"sim": 1, "ent": 3}, **args))
    assert ent_heavy.tolist() == [0, 1, 2, 3, 4]


def test_manifest_replays_selection(tmp_path, corpus):
    prefix, _ = corpus
    f = _score_file(tmp_path / "s.parquet", prefix, "similarity", "similarity", np.random.default_rng(0).random(30))
    m = select(SelectConfig(prefix, str(tmp_path / "a"), "ets", [f], sampling="soft", temperature=0.5,
                            budget=Budget("fraction", 0.4), seed=11))
    m2 = replay(str(tmp_path / "a.manifest.json"), str(tmp_path / "b"))
    assert m2["selected_doc_ids"] == m["selected_doc_ids"]
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    rc = main(["select", "--from-manifest", str(tmp_path / "a.manifest.json"), "--output-prefix", str(tmp_path / "cc")])
    assert rc == 0 and json.loads((tmp_path / "cc.manifest.json").read_text())["selected_doc_ids"] == m["selected_doc_ids"]
    _score_file(tmp_path / "s.parquet", prefix, "similarity", "similarity", np.zeros(30))  # inputs changed
    with pytest.raises(UserError, match="changed"):
        replay(str(tmp_path / "a.manifest.json"), str(tmp_path / "d"))
    assert not _outputs(str(tmp_path / "d"))


def _cli(tmp_path, prefix, *extra):
    return main(["select", "--data", prefix, "--output-prefix", str(tmp_path / "bad"), *extra])


def test_bad_inputs_clear_errors_no_outputs(tmp_path, corpus, capsys):
    prefix, _ = corpus
    good = _score_file(tmp_path / "g.parquet", prefix, "similarity", "similarity", np.arange(30.0))
    short = _score_file(tmp_path / "short.parquet", prefix, "similarity", "similarity", np.arange(29.0))
    nan = _score_file(tmp_path / "nan.parquet", prefix, "similarity", "similarity", np.r_[np.arange(29.0), np.nan])
    other = str(tmp_path / "other")
    with IndexedDatasetWriter(other, np.uint16) as w:
        for d in range(30):
            w.add_document([[d, d + 1]])
    foreign = _score_file(tmp_path / "foreign.parquet", other, "similarity", "similarity", np.arange(30.0))
    (tmp_path / "junk.parquet").write_text("not parquet")
    cases = [
        (["--scores", short, "--strategy", "ets", "--budget-fraction", "0.1"], "has 29 rows but the dataset has 30"),
        (["--scores", foreign, "--strategy", "ets", "--budget-fraction", "0.1"], "scores dataset"),
        (["--scores", nan, "--strategy", "ets", "--budget-fraction", "0.1"], "1 non-finite similarity values (first at doc_id 29)"),
        (["--scores", good, "--strategy", "ets", "--budget-fraction", "1.5"], "--budget-fraction must be in (0, 1]"),
        (["--scores", good, "--strategy", "ets", "--budget-tokens", "1e9"], "exceeds the corpus"),
        (["--scores", good, "--strategy", "ets", "--budget-docs", "31"], "exceeds the corpus"),
        (["--scores", good, "--strategy", "ets", "--budget-docs", "30"], "exceeds the 29 selectable"),
        (["--scores", good, "--strategy", "eta-ppl", "--budget-fraction", "0.1"], "needs a nll_mean score file"),
        (["--scores", good, good, "--strategy", "ets", "--budget-fraction", "0.1"], "is also given by"),
        (["--scores", good, "--strategy", "ets"], "a budget is needed"),
        (["--scores", good, "--strategy", "ets", "--weights", "sim=1", "--budget-fraction", "0.1"], "combined only"),
        (["--scores", str(tmp_path / "junk.parquet"), "--strategy", "ets", "--budget-fraction", "0.1"], "not a readable Parquet"),
        (["--scores", str(tmp_path / "none.parquet"), "--strategy", "ets", "--budget-fraction", "0.1"], "does not exist"),
    ]
    for args, msg in cases:
        assert _cli(tmp_path, prefix, *args) == 2, args
        assert msg in capsys.readouterr().err, (args, msg)
        assert not _outputs(str(tmp_path / "bad")), args
    with pytest.raises(SystemExit) as e:  # argparse rejects an unknown strategy
        _cli(tmp_path, prefix, "--strategy", "best", "--budget-fraction", "0.1")
    assert e.value.code == 2 and "invalid choice: 'best'" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown strategy"):
        SelectConfig(prefix, "x", "best", budget=Budget("fraction", 0.1)).validate()
    # an existing selection is not replaced silently
    assert _cli(tmp_path, prefix, "--strategy", "random", "--budget-fraction", "0.1") == 0
    assert _cli(tmp_path, prefix, "--strategy", "random", "--budget-fraction", "0.1") == 2
    assert "--overwrite" in capsys.readouterr().err


def test_default_soft_sampling_is_halfway_between_random_and_hard():
    """docs/method.md §2.6: on percentile ranks, a 10% soft sample takes about half its documents from the
    top decile with the default (exp, T = 0.1); the former default (power, T = 1) barely beats random."""
    from megacpt.selection.sample import DEFAULT_SOFT_WEIGHTING, SOFT_WEIGHTINGS

    n = 5000
    r = (np.arange(n) + 0.5) / n

    def share(weighting, t):
        return np.mean([(r[soft_order(r, t, s, weighting=weighting)[: n // 10]] > 0.9).mean() for s in range(10)])

    default = share(DEFAULT_SOFT_WEIGHTING, SOFT_WEIGHTINGS[DEFAULT_SOFT_WEIGHTING][1])
    assert 0.50 < default < 0.62
    assert 0.15 < share("power", 1.0) < 0.22
    assert share("exp", 1e-6) == 1.0     # no overflow at tiny temperatures: the hard selection


def test_manifest_without_soft_weighting_replays_as_power(tmp_path, corpus):
    prefix, _ = corpus
    f = _score_file(tmp_path / "s.parquet", prefix, "similarity", "similarity", np.random.default_rng(1).random(30))
    m = select(SelectConfig(prefix, str(tmp_path / "a"), "ets", [f], sampling="soft", soft_weighting="power",
                            budget=Budget("fraction", 0.4), seed=5))
    assert m["temperature"] == 1.0 and m["soft_weighting"] == "power"
    old = {k: v for k, v in m.items() if k != "soft_weighting"}          # as written before the option existed
    (tmp_path / "old.manifest.json").write_text(json.dumps(old))
    assert replay(str(tmp_path / "old.manifest.json"), str(tmp_path / "b"))["selected_doc_ids"] == m["selected_doc_ids"]
