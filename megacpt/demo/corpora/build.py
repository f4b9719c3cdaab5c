"""Build the demo's corpora from raw records (real, fetched; or synthetic): JSONL files + a stats card.

Layout written to ``out_dir`` (every file JSONL, one ``{"text": ...}`` object a line, atomic):

| file | what | role in the pipeline |
|---|---|---|
| ``general_train`` | general news articles | pre-training corpus of the base model |
| ``general_eval`` | held-out general news | forgetting check (general perplexity) |
| ``domain_crawl`` | Reuters newswire + daily headline digests + off-domain noise (news, boilerplate) | the corpus D that selection draws from; ``source`` says which kind each doc is |
| ``domain_eval`` | Reuters ModApte *test* articles | domain held-out perplexity |
| ``task_unlabeled`` | the texts of ``tasks/headline_sentiment/train.jsonl`` | ETS's unlabeled task examples |
| ``tasks/headline_sentiment/{train,test}.jsonl`` + ``task.yaml`` | headlines with weak sentiment labels (Loughran-McDonald lexicon) | `megacpt eval finance` custom task: train = few-shot pool, test = scored |
| ``tasks/reuters_grain/{train,test}.jsonl`` + ``task.yaml`` | Reuters lead paragraph + real ModApte "grain" topic label | a second, real-label classification task |

The splits are disjoint (no text appears in two files) and deterministic under ``seed``. The task
directories follow `megacpt eval finance --data-dir`'s layout (``DIR/<task>/{train,test}.jsonl``).
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from megacpt.demo.corpora import sources as S
from megacpt.demo.corpora.raw import RawCorpora
from megacpt.demo.corpora.synthetic import synthetic_raw
from megacpt.io import atomic_path, write_json_atomic


@dataclass
class CorpusSizes:
    """How much of each source the demo uses (None = all). ``quick`` keeps CI under 3 minutes."""

    general_train_docs: int | None = 1500
    general_eval_docs: int = 100
    domain_reuters_docs: int | None = 1000
    domain_digest_days: int | None = 100
    noise_fraction: float = 0.25           # off-domain share of the crawl (news + boilerplate)
    boilerplate_fraction: float = 0.2      # of the noise, the share that is web boilerplate
    domain_eval_docs: int | None = 200
    task_train_docs: int = 400
    task_test_docs: int = 200
    grain_test_docs: int = 100
    max_doc_words: int = 400               # long articles are cut at a sentence boundary near this

    @classmethod
    def quick(cls) -> "CorpusSizes":
        return cls(general_train_docs=500, general_eval_docs=40, domain_reuters_docs=300, domain_digest_days=20,
                   domain_eval_docs=60, task_train_docs=60, task_test_docs=60, grain_test_docs=60,
                   max_doc_words=250)


FILES = ("general_train", "general_eval", "domain_crawl", "domain_eval", "task_unlabeled",
         "tasks/headline_sentiment/train", "tasks/headline_sentiment/test",
         "tasks/reuters_grain/train", "tasks/reuters_grain/test")
TASKS = {  # `megacpt eval finance` custom task specs (DIR/<task>/task.yaml)
    "headline_sentiment": "kind: classification\nlabels: [negative, neutral, positive]\ntemplate: fpb\nshots: 5\n",
    "reuters_grain": "kind: classification\nlabels: [other, grain]\ntemplate: classification\nshots: 4\n",
}
PRIMARY_TASK = "headline_sentiment"
SENTIMENT_LABELS = ("negative", "neutral", "positive")

# Crawl noise that every web corpus carries; selection should learn to skip it.
_BOILERPLATE = [
    "Accept all cookies. We use cookies to improve your experience on our site and to show you relevant "
    "advertising. By continuing to browse you agree to our use of cookies. Manage preferences.",
    "Sign in | Register | Subscribe. Home News Sport Business Opinion Culture Lifestyle More. "
    "Follow us on social media. Share this article. Copy link. Print.",
    "Page not found. The page you were looking for does not exist or has been moved. Return to the homepage "
    "or use the search box above.",
    "Terms of use. Privacy policy. Contact us. Advertise with us. All rights reserved. Reproduction in whole "
    "or in part without permission is prohibited.",
    "Click here to read more. Related stories. Most popular. Most shared. Newsletter sign-up: get the "
    "morning briefing delivered to your inbox every weekday.",
]


def weak_sentiment(text: str, pos: frozenset[str], neg: frozenset[str]) -> str:
    """Lexicon label: more LM-positive than LM-negative words -> positive, fewer -> negative, else neutral."""
    words = re.findall(r"[a-z]+", text.lower())
    s = sum(w in pos for w in words) - sum(w in neg for w in words)
    return "positive" if s > 0 else "negative" if s < 0 else "neutral"


def _cut(text: str, max_words: int) -> str:
    words = text.split(" ")
    if len(words) <= max_words:
        return text
    head = " ".join(words[:max_words])
    end = head.rfind(". ")
    return head[: end + 1] if end > len(head) // 2 else head


def _lead(article: str, n_words: int = 60) -> str:
    """Title line + start of the body of a Reuters article, flattened to one line (task input)."""
    flat = " ".join(article.split())
    return _cut(flat, n_words)


def build_corpora(raw: RawCorpora, out_dir: Path, sizes: CorpusSizes, seed: int) -> dict:
    """Write the JSONL files of the module docstring to ``out_dir``; return the stats card (also written)."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs: dict[str, list[dict]] = {}

    news = [f"{t}\n\n{_cut(b, sizes.max_doc_words)}" for t, b in raw.news]
    rng.shuffle(news)
    n_eval = min(sizes.general_eval_docs, len(news) // 10)
    reuters = [(_cut(t, sizes.max_doc_words), y) for t, y in raw.reuters_train]
    rng.shuffle(reuters)
    reuters = reuters[: sizes.domain_reuters_docs]

    # Headlines: task splits first (their texts are the task), the rest become daily digests in the crawl.
    heads = list(raw.headlines)
    rng.shuffle(heads)
    task_train, task_test = heads[: sizes.task_train_docs], heads[sizes.task_train_docs:][: sizes.task_test_docs]
    by_day: dict[str, list[str]] = defaultdict(list)
    for text, day in heads[sizes.task_train_docs + sizes.task_test_docs:]:
        by_day[day].append(text)
    days = sorted(by_day)
    rng.shuffle(days)
    digests = [f"Business headlines, {d}.\n" + "\n".join(sorted(by_day[d]))
               for d in sorted(days[: sizes.domain_digest_days])]

    n_domain = len(reuters) + len(digests)
    n_noise = round(n_domain * sizes.noise_fraction / (1 - sizes.noise_fraction))
    n_boiler = round(n_noise * sizes.boilerplate_fraction)
    n_news_noise = min(n_noise - n_boiler, max(0, len(news) - n_eval - 1))
    general_eval, noise_news, general_train = news[:n_eval], news[n_eval:n_eval + n_news_noise], \
        news[n_eval + n_news_noise:][: sizes.general_train_docs]
    boiler = [" ".join(rng.sample(_BOILERPLATE, k=rng.randint(1, 3))) for _ in range(n_boiler)]

    crawl = ([{"text": t, "source": "reuters"} for t, _ in reuters]
             + [{"text": t, "source": "headline-digest"} for t in digests]
             + [{"text": t, "source": "noise-news"} for t in noise_news]
             + [{"text": t, "source": "noise-boilerplate"} for t in boiler])
    rng.shuffle(crawl)

    docs["general_train"] = [{"text": t} for t in general_train]
    docs["general_eval"] = [{"text": t} for t in general_eval]
    docs["domain_crawl"] = crawl
    test = list(raw.reuters_test)
    rng.shuffle(test)
    docs["domain_eval"] = [{"text": _cut(t, sizes.max_doc_words)} for t, _ in test[: sizes.domain_eval_docs]]
    lab = lambda t: weak_sentiment(t, raw.lexicon_pos, raw.lexicon_neg)  # noqa: E731
    docs["task_unlabeled"] = [{"text": t} for t, _ in task_train]
    docs["tasks/headline_sentiment/train"] = [{"text": t, "label": lab(t)} for t, _ in task_train]
    docs["tasks/headline_sentiment/test"] = [{"text": t, "label": lab(t)} for t, _ in task_test]
    # Grain task: few-shot pool from Reuters train articles *not* in the crawl, scored on the test split
    # (the domain eval set uses the same test articles for perplexity: a held-out split, never trained on).
    in_crawl = {t for t, _ in reuters}
    pool = [(t, y) for t, y in raw.reuters_train if _cut(t, sizes.max_doc_words) not in in_crawl]
    if len(pool) < 16:  # the whole train split is in the crawl: take shots from the test split's tail
        pool = test[max(sizes.grain_test_docs, sizes.domain_eval_docs or len(test)):]
    yn = lambda y: "grain" if y else "other"  # noqa: E731
    docs["tasks/reuters_grain/train"] = [{"text": _lead(t), "label": yn(y)} for t, y in pool[:200]]
    docs["tasks/reuters_grain/test"] = [{"text": _lead(t), "label": yn(y)} for t, y in test[: sizes.grain_test_docs]]

    for name in FILES:
        with atomic_path(out_dir / f"{name}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for d in docs[name]:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    for task, spec in TASKS.items():
        with atomic_path(out_dir / "tasks" / task / "task.yaml") as tmp:
            tmp.write_text(spec, encoding="utf-8")

    card = {
        "origin": raw.origin,
        "seed": seed,
        "sizes": asdict(sizes),
        "provenance": raw.provenance,
        "files": {name: {"docs": len(docs[name]), "words": sum(len(d["text"].split()) for d in docs[name])}
                  for name in FILES},
        "domain_crawl_sources": dict(sorted(Counter(d["source"] for d in crawl).items())),
        "task_label_counts": dict(sorted(Counter(d["label"] for d in docs["tasks/headline_sentiment/test"]).items())),
        "grain_label_counts": dict(sorted(Counter(d["label"] for d in docs["tasks/reuters_grain/test"]).items())),
        "weak_labels": "headline_sentiment labels come from the Loughran-McDonald lexicon (weak, not human); "
                       "reuters_grain labels are Reuters-21578's own topic labels"
                       + (" on synthetic text" if raw.origin == "synthetic" else ""),
    }
    write_json_atomic(out_dir / "corpora.json", card)
    return card


def load_raw(synthetic: bool, seed: int, cache_root: Path | None = None) -> RawCorpora:
    """The raw records: fetched from the registries (cached), or generated offline."""
    if synthetic:
        return synthetic_raw(seed)
    paths = S.fetch_all(cache_root)
    pos, neg = S.read_lm_lexicon(paths["lm-lexicon"])
    return RawCorpora(
        reuters_train=S.read_reuters_arff(paths["reuters-grain-train"]),
        reuters_test=S.read_reuters_arff(paths["reuters-grain-test"]),
        headlines=S.read_guardian_headlines(paths["guardian-headlines"]),
        news=S.read_news_articles(paths["news-articles"]),
        lexicon_pos=pos, lexicon_neg=neg, origin="real",
        provenance=[f"{s.name}: {s.license_note} ({s.registry}:{s.package}, {s.member}, sha256 {s.sha256[:12]})"
                    for s in S.SOURCES.values()],
    )
