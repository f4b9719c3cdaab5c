import math

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.selection.pos_entropy import PosEntropyConfig, entropy, split_pieces, tag_counts
from megacpt.score.files import read_scores
from tests.selection.conftest import write_text_dataset


def _h(*counts):
    n = sum(counts)
    return -sum(c / n * math.log(c / n) for c in counts)


def test_entropy_hand_computed():
    assert entropy({"NOUN": 2, "VERB": 2}) == pytest.approx(math.log(2))
    assert entropy({"NOUN": 3, "VERB": 1}) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert entropy({}) == 0.0 and entropy({"X": 5}) == 0.0


def test_split_pieces_covers_text_at_whitespace():
    text = " ".join(f"word{i}" for i in range(500))
    pieces, truncated = split_pieces(text, 0, 100)
    assert "".join(pieces) == text and not truncated
    assert all(len(p) <= 100 for p in pieces) and all(p.endswith(" ") for p in pieces[:-1])
    pieces, truncated = split_pieces(text, 1000, 100)
    assert truncated and len("".join(pieces)) <= 1000 and text.startswith("".join(pieces))
    assert split_pieces("", 10, 5) == ([], False)


def test_spacy_tags_hand_built_texts(spacy_nlp):
    cfg = PosEntropyConfig()
    texts = ["The cat sat on the mat.",  # DET NOUN VERB ADP DET NOUN PUNCT
             "Dogs bark.",                # NOUN VERB PUNCT
             "", "123 456 !!! 789", "   \n  "]
    out = tag_counts(spacy_nlp, texts, cfg)
    assert out["pos_entropy"][0] == pytest.approx(_h(2, 2, 1, 1, 1))
    assert out["n_tagged"][0] == 7 and out["n_alpha"][0] == 6
    assert out["pos_entropy"][1] == pytest.approx(_h(1, 1, 1))
    # documents without an alphabetic token: entropy 0 by definition, tagged tokens still counted
    assert out["pos_entropy"][2:].tolist() == [0.0, 0.0, 0.0]
    assert out["n_alpha"][2:].tolist() == [0, 0, 0]
    assert out["n_tagged"][2] == 0 and out["n_tagged"][3] > 0 and out["n_tagged"][4] == 0


def test_pieces_sum_counts(spacy_nlp):
    text = "The cat sat on the mat. " * 20
    whole = tag_counts(spacy_nlp, [text], PosEntropyConfig(piece_chars=100_000))
    pieces = tag_counts(spacy_nlp, [text], PosEntropyConfig(piece_chars=48))
    assert pieces["n_tagged"][0] == whole["n_tagged"][0]
    assert pieces["pos_entropy"][0] == pytest.approx(whole["pos_entropy"][0])


def test_cli_scores_dataset_workers_and_resume(tmp_path, tokenizer_dir, spacy_nlp, capsys):
    texts = ["The cat sat on the mat.", "", "Dogs bark.", "Revenue rose 5 percent in the quarter."] * 3
    prefix = write_text_dataset(tmp_path / "ds", texts, tokenizer_dir)
    out1, out2 = tmp_path / "e1.parquet", tmp_path / "e2.parquet"
    assert main(["score", "pos-entropy", "--data", prefix, "--out", str(out1), "--shard-docs", "5"]) == 0
    assert main(["score", "pos-entropy", "--data", prefix, "--out", str(out2), "--shard-docs", "5",
                 "--workers", "2"]) == 0
    a, b = read_scores(out1), read_scores(out2)
    assert a.meta["scorer"] == "pos-entropy" and a.meta["dataset"]["num_documents"] == 12
    assert a.columns["doc_id"].tolist() == list(range(12))
    np.testing.assert_allclose(a.columns["pos_entropy"], b.columns["pos_entropy"])
    assert a.columns["pos_entropy"][0] == pytest.approx(_h(2, 2, 1, 1, 1))  # EOD stripped before decoding
    assert a.columns["pos_entropy"][1] == 0.0 and a.columns["n_tagged"][1] == 0
    assert not (tmp_path / "e1.parquet.shards").exists()
    # existing output is not silently replaced
    assert main(["score", "pos-entropy", "--data", prefix, "--out", str(out1)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_resume_skips_committed_shards(tmp_path, tokenizer_dir, spacy_nlp, monkeypatch):
    from megacpt.selection import pos_entropy

    texts = ["The cat sat on the mat."] * 6
    prefix = write_text_dataset(tmp_path / "ds", texts, tokenizer_dir)
    out = tmp_path / "e.parquet"
    calls = []
    real = pos_entropy.tag_counts

    def flaky(nlp, batch, cfg):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(nlp, batch, cfg)

    monkeypatch.setattr(pos_entropy, "tag_counts", flaky)
    with pytest.raises(KeyboardInterrupt):
        pos_entropy.score_dataset(prefix, str(out), PosEntropyConfig(shard_docs=2))
    assert not out.exists() and len(list((tmp_path / "e.parquet.shards").glob("shard_*.parquet"))) == 1
    calls.clear()
    monkeypatch.setattr(pos_entropy, "tag_counts", real)
    pos_entropy.score_dataset(prefix, str(out), PosEntropyConfig(shard_docs=2))
    assert read_scores(out).num_rows == 6
    # a different config must not reuse the shards of another
    monkeypatch.setattr(pos_entropy, "tag_counts", flaky)
    calls.clear()
    out2 = tmp_path / "f.parquet"
    with pytest.raises(KeyboardInterrupt):
        pos_entropy.score_dataset(prefix, str(out2), PosEntropyConfig(shard_docs=2))
    from megacpt.errors import UserError
    with pytest.raises(UserError, match="different dataset or scorer config"):
        pos_entropy.score_dataset(prefix, str(out2), PosEntropyConfig(shard_docs=2, max_chars=10))
