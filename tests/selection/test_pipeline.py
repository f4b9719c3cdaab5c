"""Selection end to end on a real perplexity file: `megacpt score perplexity`'s library pass over a
tiny random GPT-NeoX -> `select --strategy eta-ppl` / combined -> the written subset."""
import numpy as np
import pytest

from megacpt.data.indexed import IndexedDataset
from megacpt.selection.sample import Budget
from megacpt.score.files import read_scores
from megacpt.selection.select import SelectConfig, select
from tests.selection.conftest import write_text_dataset


@pytest.mark.integration
def test_perplexity_scores_drive_eta_ppl(tmp_path, tokenizer_dir, mixed_corpus):
    torch = pytest.importorskip("torch")
    from megacpt.model.gpt_neox import GPTNeoX
    from megacpt.model.presets import PRESETS
    from megacpt.score.job import score_dataset

    prefix, texts, _ = mixed_corpus
    # an empty text and a one-token text: documents with n_pred = 0
    prefix = write_text_dataset(tmp_path / "c", texts[:10] + ["", "a"], tokenizer_dir, append_eod=False)
    torch.manual_seed(0)
    model = GPTNeoX(PRESETS["tiny"]).eval()
    out = str(tmp_path / "ppl.parquet")
    score_dataset(model, prefix, 32, out, progress=False)
    sf = read_scores(out)
    assert sf.num_rows == 12 and sf.columns["n_pred"][10:].tolist() == [0, 0]
    m = select(SelectConfig(prefix, str(tmp_path / "sel"), "eta-ppl", [out], budget=Budget("docs", 3)))
    nll = sf.columns["nll_mean"]
    top = np.argsort(-np.where(sf.columns["n_pred"] > 0, nll, -np.inf), kind="stable")[:3]
    assert m["selected_doc_ids"] == sorted(top.tolist()) and m["scores"][0]["metric"] == "ppl"
    ds = IndexedDataset(tmp_path / "sel")
    assert ds.num_documents == 3
    # the one-token document (n_pred = 0) has no perplexity: it ranks last, behind all 10 scored ones
    m = select(SelectConfig(prefix, str(tmp_path / "all"), "eta-ppl", [out], budget=Budget("docs", 10)))
    assert 11 not in m["selected_doc_ids"]
