"""Build the demo's corpora from raw records (real, fetched; or synthetic): JSONL files + a stats card.

Layout written to ``out_dir`` (every file JSONL, one ``{"text": ...}`` object a line, atomic):

| file | what | role in the study |
|---|---|---|
| ``general_train`` | general news articles | pre-training corpus of the base model |
| ``general_eval`` | held-out general news | forgetting check (general perplexity) |
| ``domain_crawl`` | Reuters newswire (ModApte train) + daily business-headline digests | the in-domain crawl D of the main experiment; ``source`` says which kind each doc is |
| ``domain_val`` | Reuters (ModApte test) + digests of held-out days | chooses the best strategy for the compute-matched arm (never reported as a result) |
| ``domain_eval`` | Reuters (ModApte test) + digests of other held-out days | domain held-out perplexity (same sources as the crawl, disjoint) |
| ``domain_crawl_noisy`` | ``domain_crawl`` + off-domain noise (news, web boilerplate): ``noise_fraction`` of its documents | the noisy-crawl ablation |
| ``task_unlabeled`` | the inputs of every task's train split | ETS's unlabeled task examples |
| ``task_inputs_eval`` | the inputs of every task's test split | held-out perplexity on what ETS targets |
| ``tasks/headline_sentiment/{train,test}.jsonl`` + ``task.yaml`` | headlines with weak sentiment labels (Loughran-McDonald lexicon) | classification task (probe, calibrated label scoring) |
| ``tasks/reuters_grain/{train,test}.jsonl`` + ``task.yaml`` | Reuters lead paragraph + real ModApte "grain" topic label | a second, real-label classification task |

The splits are disjoint (no text appears in two of: the training files, the held-out files, the task
test splits) and deterministic under ``seed``. The task directories follow `megacpt eval finance
--data-dir`'s layout (``DIR/<task>/{train,test}.jsonl``).
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

    general_train_docs: int | None = None
    general_eval_docs: int = 60
    max_doc_words: int = 400               # long articles are cut at a sentence boundary near this
    domain_reuters_docs: int | None = None  # of the ModApte train split left after the grain task's train pool
    eval_digest_share: float = 0.12        # of the headline days: digests of domain_eval
    val_digest_share: float = 0.06         # of the headline days: digests of domain_val
    domain_val_reuters: int = 80           # ModApte test articles in domain_val
    domain_eval_reuters: int | None = 150   # in domain_eval (None: the rest after the grain test split)
    noise_fraction: float = 0.25           # off-domain share of the noisy crawl's documents
    boilerplate_fraction: float = 0.2      # of the noise, the share that is web boilerplate
    sentiment_train_docs: int = 600
    sentiment_test_docs: int = 300
    grain_train_docs: int = 200            # ModApte train articles kept out of the crawl for the grain task
    grain_test_docs: int = 250             # ModApte test articles

    @classmethod
    def quick(cls) -> "CorpusSizes":
        return cls(general_train_docs=500, general_eval_docs=40, max_doc_words=250, domain_reuters_docs=300,
                   domain_val_reuters=30, domain_eval_reuters=60, sentiment_train_docs=120, sentiment_test_docs=80,
                   grain_train_docs=80, grain_test_docs=80)


FILES = ("general_train", "general_eval", "domain_crawl", "domain_val", "domain_eval", "domain_crawl_noisy",
         "task_unlabeled", "task_inputs_eval",
         "tasks/headline_sentiment/train", "tasks/headline_sentiment/test",
         "tasks/reuters_grain/train", "tasks/reuters_grain/test")
TASKS = {  # `megacpt eval finance` custom task specs (DIR/<task>/task.yaml)
    "headline_sentiment": "kind: classification\nlabels: [negative, neutral, positive]\ntemplate: fpb\nshots: 0\n",
    "reuters_grain": "kind: classification\nlabels: [other, grain]\ntemplate: classification\nshots: 0\n",
}
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
    return _cut(" ".join(article.split()), n_words)


def _unique(records: list[tuple]) -> list[tuple]:
    """First record of each distinct text (a text in two splits would leak held-out data into training)."""
    seen: set[str] = set()
    return [r for r in records if not (r[0] in seen or seen.add(r[0]))]


def _digests(by_day: dict[str, list[str]], days: list[str]) -> list[str]:
    return [f"Business headlines, {d}.\n" + "\n".join(sorted(by_day[d])) for d in sorted(days)]


def build_corpora(raw: RawCorpora, out_dir: Path, sizes: CorpusSizes, seed: int) -> dict:
    """Write the JSONL files of the module docstring to ``out_dir``; return the stats card (also written)."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs: dict[str, list[dict]] = {}
    cut = lambda t: _cut(t, sizes.max_doc_words)  # noqa: E731

    # Reuters: the grain task's train pool, then the crawl, from ModApte train; held-out sets from ModApte test
    train = _unique([(cut(t), y) for t, y in raw.reuters_train])
    rng.shuffle(train)
    grain_pool, crawl_reuters = train[: sizes.grain_train_docs], train[sizes.grain_train_docs:]
    crawl_reuters = crawl_reuters[: sizes.domain_reuters_docs]
    seen = {t for t, _ in train}
    test = [(t, y) for t, y in _unique([(cut(t), y) for t, y in raw.reuters_test]) if t not in seen]
    rng.shuffle(test)
    pool_leads = {_lead(t) for t, _ in grain_pool}
    grain_test = [(t, y) for t, y in test if _lead(t) not in pool_leads][: sizes.grain_test_docs]
    in_grain = {t for t, _ in grain_test}
    test = grain_test + [(t, y) for t, y in test if t not in in_grain]
    grain_test, rest = test[: sizes.grain_test_docs], test[sizes.grain_test_docs:]
    val_reuters, eval_reuters = rest[: sizes.domain_val_reuters], rest[sizes.domain_val_reuters:]
    eval_reuters = eval_reuters[: sizes.domain_eval_reuters]

    # Headlines: the sentiment task's splits first, the rest become daily digests (crawl / val / eval days)
    heads = _unique(raw.headlines)
    rng.shuffle(heads)
    n_tr, n_te = sizes.sentiment_train_docs, sizes.sentiment_test_docs
    sent_train, sent_test = heads[:n_tr], heads[n_tr:n_tr + n_te]
    by_day: dict[str, list[str]] = defaultdict(list)
    for text, day in heads[n_tr + n_te:]:
        by_day[day].append(text)
    days = sorted(by_day)
    rng.shuffle(days)
    n_eval_days = max(1, round(sizes.eval_digest_share * len(days)))
    n_val_days = max(1, round(sizes.val_digest_share * len(days)))
    eval_days, val_days = days[:n_eval_days], days[n_eval_days:n_eval_days + n_val_days]
    crawl_days = days[n_eval_days + n_val_days:]

    crawl = [{"text": t, "source": "reuters"} for t, _ in crawl_reuters] + \
            [{"text": t, "source": "headline-digest"} for t in _digests(by_day, crawl_days)]
    rng.shuffle(crawl)
    docs["domain_crawl"] = crawl
    docs["domain_val"] = [{"text": t} for t, _ in val_reuters] + [{"text": t} for t in _digests(by_day, val_days)]
    docs["domain_eval"] = [{"text": t} for t, _ in eval_reuters] + [{"text": t} for t in _digests(by_day, eval_days)]

    # General news: held-out set, the noise of the ablation's crawl, the base's pre-training corpus
    news = [f"{t}\n\n{cut(b)}" for t, b in raw.news]
    rng.shuffle(news)
    n_eval = min(sizes.general_eval_docs, len(news) // 10)
    n_noise = round(len(crawl) * sizes.noise_fraction / (1 - sizes.noise_fraction))
    n_boiler = round(n_noise * sizes.boilerplate_fraction)
    n_news_noise = min(n_noise - n_boiler, max(0, len(news) - n_eval - 1))
    docs["general_eval"] = [{"text": t} for t in news[:n_eval]]
    noise_news = news[n_eval:n_eval + n_news_noise]
    docs["general_train"] = [{"text": t} for t in news[n_eval + n_news_noise:][: sizes.general_train_docs]]
    boiler = [" ".join(rng.sample(_BOILERPLATE, k=rng.randint(1, 3))) for _ in range(n_boiler)]
    noisy = crawl + [{"text": t, "source": "noise-news"} for t in noise_news] + \
        [{"text": t, "source": "noise-boilerplate"} for t in boiler]
    rng.shuffle(noisy)
    docs["domain_crawl_noisy"] = noisy

    # Tasks: ETS is given the inputs of every task's train split; task-input perplexity uses the test inputs
    lab = lambda t: weak_sentiment(t, raw.lexicon_pos, raw.lexicon_neg)  # noqa: E731
    yn = lambda y: "grain" if y else "other"  # noqa: E731
    docs["tasks/headline_sentiment/train"] = [{"text": t, "label": lab(t)} for t, _ in sent_train]
    docs["tasks/headline_sentiment/test"] = [{"text": t, "label": lab(t)} for t, _ in sent_test]
    docs["tasks/reuters_grain/train"] = [{"text": _lead(t), "label": yn(y)} for t, y in grain_pool]
    docs["tasks/reuters_grain/test"] = [{"text": _lead(t), "label": yn(y)} for t, y in grain_test]
    docs["task_unlabeled"] = [{"text": d["text"]} for k in ("tasks/headline_sentiment/train", "tasks/reuters_grain/train")
                              for d in docs[k]]
    docs["task_inputs_eval"] = [{"text": d["text"]} for k in ("tasks/headline_sentiment/test", "tasks/reuters_grain/test")
                                for d in docs[k]]

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
        "domain_crawl_noisy_sources": dict(sorted(Counter(d["source"] for d in noisy).items())),
        "task_label_counts": {task: dict(sorted(Counter(d["label"] for d in docs[f"tasks/{task}/test"]).items()))
                              for task in TASKS},
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
