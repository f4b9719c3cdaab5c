import numpy as np
import pytest

from megacpt.cli import main
from megacpt.selection.dsir import DsirConfig, bucket_counts, log_ratio, score_counts, vectorizer
from megacpt.score.files import read_scores
from megacpt.selection.select import SelectConfig, compute_selection
from megacpt.selection.sample import Budget


def test_log_weight_hand_computed():
    cfg = DsirConfig(num_buckets=2 ** 16, ngram=1)
    vec = vectorizer(cfg)
    x = bucket_counts(["a a b", "b", ""], vec)
    assert x.sum() == 4 and x[2].sum() == 0
    target = np.asarray(bucket_counts(["a"], vec).sum(0)).ravel()
    raw = np.asarray(x.sum(0)).ravel()
    lr = log_ratio(target, raw, 1.0)
    ia, ib = np.flatnonzero(bucket_counts(["a"], vec).toarray()[0])[0], np.flatnonzero(bucket_counts(["b"], vec).toarray()[0])[0]
    B = cfg.num_buckets
    pt_a, pt_b = 2 / (1 + B), 1 / (1 + B)
    pr_a, pr_b = 3 / (4 + B), 3 / (4 + B)
    assert lr[ia] == pytest.approx(np.log(pt_a / pr_a)) and lr[ib] == pytest.approx(np.log(pt_b / pr_b))
    w, n = score_counts(x, lr)
    assert w[0] == pytest.approx(2 * lr[ia] + lr[ib]) and w[2] == 0.0 and n.tolist() == [3, 1, 0]
    wm, _ = score_counts(x, lr, "mean")
    np.testing.assert_allclose(wm, [w[0] / 3, w[1], 0.0])


def test_bigrams_counted():
    vec = vectorizer(DsirConfig())
    assert bucket_counts(["Net income rose"], vec).sum() == 3 + 2


def test_dsir_prints_progress_with_eta(tmp_path, mixed_corpus, task_jsonl, capsys):
    """The text scorers' shared driver (run_sharded): a line per interval with docs/s and an ETA."""
    prefix, _, _ = mixed_corpus
    assert main(["score", "dsir", "--data", prefix, "--task-data", task_jsonl, "--out", str(tmp_path / "d.parquet"),
                 "--shard-docs", "8"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("dsir: ")]
    assert lines[0].startswith("dsir: 8/40 docs (20.0%), ") and "docs/s" in lines[0] and "ETA" in lines[0], lines
    assert lines[-1].startswith("dsir: 40/40 docs (100.0%), ") and "took" in lines[-1], lines


def test_dsir_ranks_in_domain_and_selects(tmp_path, mixed_corpus, task_jsonl):
    prefix, texts, labels = mixed_corpus
    out = tmp_path / "dsir.parquet"
    assert main(["score", "dsir", "--data", prefix, "--task-data", task_jsonl, "--out", str(out),
                 "--shard-docs", "16"]) == 0
    s = read_scores(out)
    w = s.columns["dsir_log_weight"]
    assert s.meta["scorer"] == "dsir" and s.columns["n_ngrams"].min() > 0
    top = np.argsort(-w)[:4]
    assert labels[top].all()
    ids, info = compute_selection(SelectConfig(prefix, "x", "dsir", [str(out)], budget=Budget("docs", 10)))
    assert labels[ids].mean() >= 0.9
    # the sampled raw fit is a different config: its shards never mix with the full fit's
    out2 = tmp_path / "dsir2.parquet"
    assert main(["score", "dsir", "--data", prefix, "--task-data", task_jsonl, "--out", str(out2),
                 "--raw-sample-docs", "10"]) == 0
    assert read_scores(out2).meta["config"]["raw_sample_docs"] == 10
