"""`megacpt score SCORER`, `megacpt select`, `megacpt report selection`: argparse and ``run`` of the
selection commands over the selection library (and the scoring pass's own CLI for `score perplexity`).

Scorer flags come from one builder (``megacpt.score.flags``). A scorer's options are built only when it is
the one asked for, so `megacpt score pos-entropy` never imports torch (perplexity's CLI loads it).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NamedTuple

from megacpt.config import add_dtype_argument
from megacpt.errors import UserError
from megacpt.score.flags import add_scorer_arguments, add_task_data_arguments, add_text_arguments
from megacpt.selection import dsir, pos_entropy, similarity
from megacpt.selection.combine import STRATEGIES, parse_weights
from megacpt.selection.report import build_report
from megacpt.selection.sample import DEFAULT_SOFT_WEIGHTING, SOFT_WEIGHTINGS, Budget
from megacpt.selection.select import SelectConfig, replay, select


# -- `megacpt score pos-entropy` --------------------------------------------------------------------------
def add_pos_entropy_arguments(p: argparse.ArgumentParser) -> None:
    d = pos_entropy.PosEntropyConfig()
    add_scorer_arguments(p, ("pos_entropy", "n_tagged", "n_alpha", "truncated"), d.shard_docs)
    p.add_argument("--workers", type=int, default=d.workers, help="tagging processes")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="characters tagged per document (0: all)")
    p.add_argument("--piece-chars", type=int, default=d.piece_chars, help="longest text piece per spaCy call")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="texts per nlp.pipe batch")
    p.add_argument("--spacy-model", default=d.model, help="spaCy package name (default: auto)")
    add_text_arguments(p)


def run_pos_entropy(args: argparse.Namespace) -> int:
    cfg = pos_entropy.PosEntropyConfig(model=args.spacy_model, batch_size=args.batch_size, max_chars=args.max_chars,
                                       piece_chars=args.piece_chars, workers=args.workers,
                                       shard_docs=args.shard_docs)
    pos_entropy.score_dataset(args.data, args.out, cfg, args.tokenizer, args.overwrite)
    return 0


# -- `megacpt score similarity` ---------------------------------------------------------------------------
def add_similarity_arguments(p: argparse.ArgumentParser) -> None:
    d = similarity.SimilarityConfig()
    add_scorer_arguments(p, ("similarity", "n_chunks"), d.shard_docs)
    add_task_data_arguments(p)
    p.add_argument("--reduce", choices=similarity.REDUCE, default=d.reduce,
                   help="cosine to the task centroid, or max over tasks")
    p.add_argument("--embedding-model", default=d.model, help="sentence-transformers dir (default: bundled MiniLM)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="chunks per forward pass")
    p.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens, help="model tokens per chunk (0: window)")
    p.add_argument("--max-chunks", type=int, default=d.max_chunks, help="chunks embedded per document")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    add_dtype_argument(p, d.dtype, choices=("fp32", "bf16", "auto"),
                       help="auto: bf16 on cuda, fp32 on cpu (recorded in the output metadata)")
    add_text_arguments(p)


def run_similarity(args: argparse.Namespace) -> int:
    cfg = similarity.SimilarityConfig(model=args.embedding_model, reduce=args.reduce, batch_size=args.batch_size,
                                      chunk_tokens=args.chunk_tokens, max_chunks=args.max_chunks,
                                      device=args.device, dtype=args.dtype, shard_docs=args.shard_docs)
    similarity.score_dataset(args.data, args.task_data, args.out, cfg, args.json_keys, args.tokenizer,
                             args.overwrite)
    return 0


# -- `megacpt score dsir` ---------------------------------------------------------------------------------
def add_dsir_arguments(p: argparse.ArgumentParser) -> None:
    d = dsir.DsirConfig()
    add_scorer_arguments(p, ("dsir_log_weight", "n_ngrams"), d.shard_docs,
                         data_help="indexed dataset prefix (the raw distribution)")
    add_task_data_arguments(p)
    p.add_argument("--num-buckets", type=int, default=d.num_buckets, help="hashed n-gram buckets")
    p.add_argument("--ngram", type=int, default=d.ngram, help="largest n-gram order")
    p.add_argument("--smoothing", type=float, default=d.smoothing, help="add-k pseudo-count per bucket")
    p.add_argument("--normalize", choices=("mean", "sum"), default=d.normalize,
                   help="mean: log weight per n-gram (default); sum: DSIR's sum over the document")
    p.add_argument("--raw-sample-docs", type=int, default=d.raw_sample_docs, help="docs fitting p_R (0: all)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the raw sample")
    add_text_arguments(p)


def run_dsir(args: argparse.Namespace) -> int:
    cfg = dsir.DsirConfig(num_buckets=args.num_buckets, ngram=args.ngram, smoothing=args.smoothing,
                          normalize=args.normalize, raw_sample_docs=args.raw_sample_docs, seed=args.seed,
                          shard_docs=args.shard_docs)
    dsir.score_dataset(args.data, args.task_data, args.out, cfg, args.json_keys, args.tokenizer, args.overwrite)
    return 0


# -- `megacpt score perplexity`: the scoring pass's own CLI ----------------------------------------------
def add_perplexity_arguments(p: argparse.ArgumentParser) -> None:
    from megacpt.score import cli  # lazy: torch and the model stack load only when this scorer is chosen

    cli.add_arguments(p)


def run_perplexity(args: argparse.Namespace) -> int:
    from megacpt.score import cli  # lazy: as above

    return cli.run(args)


# -- `megacpt score SCORER` -------------------------------------------------------------------------------
class Scorer(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SCORERS: dict[str, Scorer] = {
    "perplexity": Scorer("novelty: per-document NLL under the base model", add_perplexity_arguments,
                         run_perplexity),
    "pos-entropy": Scorer("diversity: entropy of universal POS tags (spaCy)", add_pos_entropy_arguments,
                          run_pos_entropy),
    "similarity": Scorer("task similarity: cosine to task-example embeddings", add_similarity_arguments,
                         run_similarity),
    "dsir": Scorer("DSIR hashed n-gram importance weight (target = task data)", add_dsir_arguments, run_dsir),
}


class _LazySubparsers(argparse._SubParsersAction):
    """Build a scorer's options only when it is the one asked for (`--help` lists names only)."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = values[0]
        sub = self._name_parser_map.get(name)
        if name in SCORERS and not getattr(sub, "_megacpt_loaded", False):
            SCORERS[name].add_arguments(sub)
            sub.set_defaults(_scorer_run=SCORERS[name].run)
            sub._megacpt_loaded = True
        super().__call__(parser, namespace, values, option_string)


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.register("action", "lazy_parsers", _LazySubparsers)
    subs = parser.add_subparsers(dest="scorer", metavar="SCORER", required=True, action="lazy_parsers")
    for name, scorer in SCORERS.items():
        subs.add_parser(name, help=scorer.help, description=scorer.help)


def run_score(args: argparse.Namespace) -> int:
    return int(args._scorer_run(args) or 0)


# -- `megacpt select` -------------------------------------------------------------------------------------
def add_select_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="PREFIX", help="indexed dataset to select from")
    p.add_argument("--scores", nargs="+", default=[], metavar="F.parquet", help="score files (megacpt score ...)")
    p.add_argument("--strategy", choices=list(STRATEGIES), help="ets | eta-ppl | eta-ent | combined | dsir | random | full")
    p.add_argument("--weights", default=None, help="combined only: e.g. sim=1,ppl=1,ent=1 (default: equal)")
    p.add_argument("--sampling", choices=("hard", "soft"), default="hard", help="top of ranking, or weighted sampling")
    p.add_argument("--temperature", type=float, default=None,
                   help="soft sampling temperature T (default: 0.1 for exp, 1.0 for power; docs/method.md §2.6)")
    p.add_argument("--soft-weighting", choices=list(SOFT_WEIGHTINGS), default=DEFAULT_SOFT_WEIGHTING,
                   help="soft sampling weight of a percentile-rank score r: exp = exp(r/T) (default), "
                        "power = r^(1/T)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--budget-fraction", type=float, help="fraction of the corpus tokens, e.g. 0.1")
    b.add_argument("--budget-tokens", type=float, help="number of tokens")
    b.add_argument("--budget-docs", type=float, help="number of documents")
    p.add_argument("--seed", type=int, default=1234, help="seed of soft and random sampling")
    p.add_argument("--output-prefix", required=True, metavar="OUT", help="writes OUT.bin/.idx/.meta.json/.manifest.json")
    p.add_argument("--from-manifest", metavar="M", help="re-run the selection recorded in manifest M (hashes checked)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing selection at OUT")


def run_select(args: argparse.Namespace) -> int:
    if args.from_manifest:
        m = replay(args.from_manifest, args.output_prefix, args.data, args.overwrite)
    else:
        if not args.data or not args.strategy:
            raise UserError("--data and --strategy are required (or --from-manifest)")
        kind = next((k for k in ("fraction", "tokens", "docs") if getattr(args, f"budget_{k}") is not None), None)
        budget = Budget(kind, getattr(args, f"budget_{kind}")) if kind else None
        cfg = SelectConfig(data=args.data, output_prefix=args.output_prefix, strategy=args.strategy,
                           scores=args.scores, weights=parse_weights(args.weights), sampling=args.sampling,
                           temperature=args.temperature, soft_weighting=args.soft_weighting, budget=budget, seed=args.seed, overwrite=args.overwrite)
        m = select(cfg, command=sys.argv[1:])
    b = m["budget"]
    print(f"selected {b['achieved_documents']}/{b['corpus_documents']} documents, {b['achieved_tokens']:,}/"
          f"{b['corpus_tokens']:,} tokens ({100 * b['fraction_of_tokens']:.2f}%) -> {args.output_prefix}")
    return 0


# -- `megacpt report selection` ---------------------------------------------------------------------------
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    subs = p.add_subparsers(dest="report", metavar="REPORT", required=True)
    s = subs.add_parser("selection", help="compare selections over one corpus (Markdown + HTML + PNG)")
    s.add_argument("--manifests", nargs="+", required=True, metavar="M", help="OUT.manifest.json of megacpt select")
    s.add_argument("--out", required=True, metavar="DIR", help="writes DIR/report.md, report.html, *.png")
    s.add_argument("--scores", nargs="*", default=[], help="extra score files to show (beside the selections')")
    s.add_argument("--data", default=None, help="corpus prefix, if it moved since the selections were made")
    s.add_argument("--snippets", type=int, default=3, help="top/bottom documents shown per metric")
    s.add_argument("--snippet-chars", type=int, default=300, help="characters per snippet")
    s.add_argument("--random-seed", type=int, default=0, help="seed of the computed random baseline")
    s.add_argument("--tokenizer", default=None, help="override the tokenizer path named in the corpus sidecar")


def run_report(args: argparse.Namespace) -> int:
    path = build_report(args.manifests, args.out, args.scores, args.data, args.snippets, args.snippet_chars,
                        args.random_seed, args.tokenizer)
    print(f"report: {path} (+ report.html, plots) in {os.path.dirname(path)}")
    return 0


# command name -> (add its arguments, run it); dispatched by megacpt.cli
COMMANDS = {
    "score": (add_score_arguments, run_score),
    "select": (add_select_arguments, run_select),
    "report": (add_report_arguments, run_report),
}
