"""`eval perplexity` (token-weighted, vs a brute-force HF reference) and `eval compare` (table + PNG)."""
import json
import math

import numpy as np
import pytest
import torch

from megacpt.cli import main
from megacpt.data.indexed import IndexedDatasetWriter, write_sidecar


def _dataset(prefix, docs, tok_identity):
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        for d in docs:
            w.add_document([d] if len(d) else [])
    write_sidecar(prefix, {"tokenizer": tok_identity, "dtype": "uint16", "num_documents": len(docs),
                           "num_sequences": sum(1 for d in docs if len(d)), "num_tokens": sum(map(len, docs))})
    return str(prefix)


@pytest.fixture(scope="module")
def tok(tok_dir):
    from megacpt.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


def test_perplexity_token_weighted_matches_reference(model_dir, tok, tmp_path, capsys):
    texts = ["Gold prices climbed on Monday as the dollar weakened.", "", "Shares",
             "The agreement between Acme Holdings and Jane Doe was signed in London. " * 3]
    docs = [tok.encode(t) + [tok.eod] if t else [] for t in texts]
    prefix = _dataset(tmp_path / "heldout", docs, tok.identity())
    out = tmp_path / "ppl.json"
    L = 16  # forces the long document into several chunks
    assert main(["eval", "perplexity", "--model", str(model_dir), "--data", prefix, "--seq-length", str(L),
                 "--bootstrap", "20", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["tasks"]["ppl:heldout"]
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(str(model_dir)).eval()
    nll, n = 0.0, 0
    for d in docs:
        for s in range(0, len(d), L):
            chunk = d[s:s + L]
            if len(chunk) < 2:
                continue
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([chunk])).logits[0, :, : tok.vocab_size].double(), -1)
            nll -= sum(float(logp[j - 1, chunk[j]]) for j in range(1, len(chunk)))
            n += len(chunk) - 1
    assert r["n_pred"] == n and r["n"] == 4
    assert r["value"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert r["ci95"][0] <= r["value"] <= r["ci95"][1]
    assert "ppl:heldout perplexity" in capsys.readouterr().out


def test_perplexity_rejects_foreign_tokenizer(model_dir, tok, tmp_path, capsys):
    ident = {**tok.identity(), "vocab_size": 50277}
    prefix = _dataset(tmp_path / "foreign", [[5, 6, 7]], ident)
    assert main(["eval", "perplexity", "--model", str(model_dir), "--data", prefix, "--out", str(tmp_path / "p.json")]) == 2
    assert "vocab_size 50277" in capsys.readouterr().err


def _results(path, model, values):
    tasks = {t: {"metric": m, "value": v, "n": 10, "ci95": [v - 0.05, v + 0.05]} for t, (m, v) in values.items()}
    path.write_text(json.dumps({"format": "megacpt-eval-results/1", "model": {"model_path": f"/runs/{model}"},
                                "tasks": tasks}))
    return str(path)


def test_compare_table_and_plot(tmp_path, capsys):
    a = _results(tmp_path / "a.json", "base", {"fpb": ("weighted_f1", 0.5), "ppl:fin": ("perplexity", 30.0)})
    b = _results(tmp_path / "b.json", "cpt-ets", {"fpb": ("weighted_f1", 0.6), "ppl:fin": ("perplexity", 20.0),
                                                  "ner": ("entity_f1", 0.2)})
    md, png = tmp_path / "cmp.md", tmp_path / "cmp.png"
    assert main(["eval", "compare", a, b, "--out-md", str(md), "--out-png", str(png)]) == 0
    table = md.read_text()
    assert table == capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == "| task | metric | base | cpt-ets |"
    assert lines[2] == "| fpb | weighted_f1 ↑ | 0.500 [0.450, 0.550] | **0.600 [0.550, 0.650]** |"
    assert lines[3] == "| ppl:fin | perplexity ↓ | 30.00 [29.95, 30.05] | **20.00 [19.95, 20.05]** |"  # lower is better
    assert lines[4].startswith("| ner | entity_f1 ↑ | – |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["eval", "compare", a, b, "--names", "x"]) == 2
    assert "--names has 1 names for 2" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["eval", "compare", str(tmp_path / "bad.json")]) == 2
