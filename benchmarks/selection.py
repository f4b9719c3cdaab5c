"""Selection scorer throughput beside the naive loops, measured in the same run.

    python benchmarks/selection.py [--docs 400] [--chars 1500]

Corpus: English prose from the docstrings of the Python standard library (offline, real text),
cut into documents of about --chars characters, tokenized with a locally trained BPE into an
indexed dataset, so the measured scorers include reading + decoding like `megacpt score`.
Rows (docs/s, and the ratio to the naive loop of the same model):
  pos-entropy  naive: `nlp(text)` per document with the full default spaCy pipeline, and with the
               same tagger-only pipeline; megacpt: `megacpt score pos-entropy` with 1 and 2 processes.
  similarity   naive: `model.encode(text)` per document (one forward per document; texts beyond
               the window are truncated by sentence-transformers); megacpt: chunked, batched pass
               (fp32, the CPU default, and bf16).
"""
from __future__ import annotations

import argparse
import os
import pkgutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stdlib_prose(n_docs: int, chars: int) -> list[str]:
    import importlib
    import inspect
    import warnings

    seen, paras = set(), []
    warnings.simplefilter("ignore")
    stdlib = sysconfig.get_paths()["stdlib"]
    for mod in sorted(m.name for m in pkgutil.iter_modules([stdlib])):
        if mod.startswith(("_", "test", "idlelib", "tkinter", "turtle", "antigravity", "this")):
            continue
        try:
            m = importlib.import_module(mod)
        except Exception:
            continue
        for obj in [m, *vars(m).values()]:
            doc = inspect.getdoc(obj) if callable(obj) or obj is m else None
            if doc and doc not in seen and len(doc) > 200:
                seen.add(doc)
                paras.append(" ".join(doc.split()))
        if sum(map(len, paras)) > n_docs * chars * 1.2:
            break
    text = " ".join(paras)
    return [text[i * chars:(i + 1) * chars] for i in range(min(n_docs, len(text) // chars))]


def rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--chars", type=int, default=1500)
    ap.add_argument("--sim-docs", type=int, default=150)
    args = ap.parse_args()
    import numpy as np
    import spacy
    import torch

    from megacpt.data.indexed import IndexedDatasetWriter, optimal_dtype, write_sidecar
    from megacpt.data.tokenizer import load_tokenizer, train_bpe
    from megacpt.selection import pos_entropy as pe
    from megacpt.selection import similarity as sm

    texts = stdlib_prose(args.docs, args.chars)
    n = len(texts)
    tmp = Path(tempfile.mkdtemp(prefix="selbench."))
    tok = load_tokenizer(train_bpe(texts, 2000, tmp / "tok"))
    prefix = str(tmp / "corpus")
    dtype = optimal_dtype(tok.vocab_size)
    with IndexedDatasetWriter(prefix, dtype) as w:
        for t in texts:
            w.add_document([tok.encode(t) + [tok.eod]])
    write_sidecar(prefix, {"tokenizer": tok.identity(), "dtype": np.dtype(dtype).name})
    print(f"corpus: {n} docs x {args.chars} chars of stdlib docstrings; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")

    # -- pos-entropy ------------------------------------------------------------------------------
    name = next(m for m in pe.SPACY_MODELS if spacy.util.is_package(m))
    full = spacy.load(name)
    tagger = pe.load_spacy(name)
    k = min(n, 100)  # naive loops are slow: time them on a prefix
    r_full = rate(k, lambda: [full(t) for t in texts[:k]])
    r_naive = rate(k, lambda: [tagger(t) for t in texts[:k]])
    res = {}
    for workers in (1, 2):
        out = tmp / f"ent{workers}.parquet"
        res[workers] = rate(n, lambda: pe.score_dataset(prefix, str(out), pe.PosEntropyConfig(
            workers=workers, shard_docs=max(1, n // 8), model=name)))
    print(f"\npos-entropy (spaCy {name}, {n} docs)")
    print(f"  naive nlp(text), full pipeline    {r_full:8.1f} docs/s   1.00x")
    print(f"  naive nlp(text), tagger only      {r_naive:8.1f} docs/s   {r_naive / r_full:.2f}x")
    for wk, r in res.items():
        print(f"  megacpt score pos-entropy -w {wk}    {r:8.1f} docs/s   {r / r_full:.2f}x full, "
              f"{r / r_naive:.2f}x tagger-only naive")

    # -- similarity -------------------------------------------------------------------------------
    emb = sm.SentenceTransformerEmbedder("auto", "cpu")
    m = min(n, args.sim_docs)
    sub = texts[:m]
    tasks = tmp / "tasks.jsonl"
    tasks.write_text("".join('{"text": "%s"}\n' % t[:200].replace('"', "'").replace("\\", "/") for t in texts[-20:]))
    emb.encode(sub[:4], 4)  # warm-up
    r_naive = rate(m, lambda: [emb.model.encode(t, normalize_embeddings=True) for t in sub])
    cfg = sm.SimilarityConfig(shard_docs=m)
    r_ours = rate(m, lambda: sm.embed_texts(sub, emb, cfg))
    sim_prefix = str(tmp / "simcorpus")
    with IndexedDatasetWriter(sim_prefix, dtype) as w:
        for t in sub:
            w.add_document([tok.encode(t) + [tok.eod]])
    write_sidecar(sim_prefix, {"tokenizer": tok.identity(), "dtype": np.dtype(dtype).name})
    r_cli = rate(m, lambda: sm.score_dataset(sim_prefix, str(tasks), str(tmp / "sim.parquet"), cfg, embedder=emb))
    emb.model.to(torch.bfloat16)
    r_bf16 = rate(m, lambda: sm.embed_texts(sub, emb, cfg))
    chunks, _ = sm.chunk_texts(sub, emb, cfg)
    print(f"\nsimilarity (MiniLM-L6, {m} docs, {len(chunks)} chunks of <= {emb.max_tokens} tokens)")
    print(f"  naive model.encode(text) per doc  {r_naive:8.1f} docs/s   1.00x  (truncates long docs)")
    print(f"  megacpt embed_texts (batched)      {r_ours:8.1f} docs/s   {r_ours / r_naive:.2f}x  (whole docs, chunked)")
    print(f"  megacpt score similarity           {r_cli:8.1f} docs/s   {r_cli / r_naive:.2f}x")
    print(f"  megacpt embed_texts, --dtype bf16  {r_bf16:8.1f} docs/s   {r_bf16 / r_naive:.2f}x")


if __name__ == "__main__":
    main()
