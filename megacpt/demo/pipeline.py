"""The embedded default: FinPythia's pipeline end to end at toy scale, as resumable stages.

corpora -> tokenizer -> preprocess -> base pre-training (general text) -> scores of the domain crawl
(perplexity under the base, POS entropy, task similarity) -> one selection per strategy at the
token budget (+ random; "full" is the whole crawl) -> CPT of the base on each with the same
schedule -> eval of every model (domain ppl, general ppl, classification tasks) -> report.

Every stage except building the corpora and writing the report is a public `megacpt` command: the demo
is the integration test of the system, not a second implementation. By default the commands run in
this process (``megacpt.cli.main``: no interpreter + torch start-up per command); ``--child-processes``
runs each as ``python -m megacpt ...`` instead (isolated memory, per-command peak RSS from ``wait4``).
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megacpt.demo.corpora.build import PRIMARY_TASK, TASKS, CorpusSizes
from megacpt.demo.stages import Stage, StageContext, StageRunner
from megacpt.errors import UserError

STRATEGIES = ("ets", "eta-ppl", "eta-ent", "combined", "random", "full")
# strategy -> the metrics it ranks by (docs/method.md §2): ETS = similarity, ETA = novelty / diversity
STRATEGY_METRICS = {"ets": ["similarity"], "eta-ppl": ["perplexity"], "eta-ent": ["pos_entropy"],
                    "combined": ["similarity", "perplexity", "pos_entropy"], "random": []}
HELDOUT = {"domain": "domain_eval", "general": "general_eval"}


@dataclass
class ModelShape:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4


@dataclass
class DemoSettings:
    """Every number that determines the demo's results (all of it goes into the stage fingerprints)."""

    seed: int = 1234
    synthetic: bool = False
    quick: bool = False
    budget_fraction: float = 0.1
    strategies: tuple[str, ...] = STRATEGIES
    sizes: CorpusSizes = field(default_factory=CorpusSizes)
    vocab_size: int = 4096
    model: ModelShape = field(default_factory=lambda: ModelShape(128, 3, 4))
    seq_length: int = 256
    micro_batch_size: int = 16
    global_batch_size: int = 16
    base_epochs: float = 1.0        # passes over the general corpus for the base model
    base_lr: float = 3e-3
    cpt_epochs: float = 1.0         # passes over each CPT dataset (full: the whole crawl, 10x the tokens)
    cpt_lr: float = 1e-3            # CPT re-warms to a lower peak than pre-training (docs/method.md §1)
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    eval_shots: int | None = None   # None: each task's own
    eval_bootstrap: int = 200
    # MiniLM costs ~2 x 22M FLOPs per token: embedding whole documents would dominate the demo on a CPU,
    # so each document is represented by its first window(s) of this many tokens (the lead of a news text)
    similarity_chunk_tokens: int = 64
    similarity_max_chunks: int = 1
    # Toy models are overhead-bound: one intra-op thread is as fast on an idle machine and 10x faster on a
    # loaded one (OpenMP threads spin-wait for a busy core). Left out of the stage fingerprints.
    threads: int = 1
    # commands run in this process (no interpreter + torch start-up per command: ~35 commands) or as children
    in_process: bool = True

    def fingerprint_dict(self) -> dict:
        d = asdict(self)
        for k in ("threads", "in_process"):
            d.pop(k)
        return d

    @classmethod
    def make(cls, quick: bool, **kw) -> "DemoSettings":
        if quick:
            kw = {"sizes": CorpusSizes.quick(), "vocab_size": 2048, "model": ModelShape(64, 2, 4), "seq_length": 128,
                  "micro_batch_size": 8, "global_batch_size": 8, "base_epochs": 1.0, "cpt_epochs": 1.0,
                  "eval_shots": 2, "eval_bootstrap": 50, "similarity_chunk_tokens": 32,
                  **kw}
        s = cls(quick=quick, **kw)
        bad = [x for x in s.strategies if x not in STRATEGIES]
        if bad or not s.strategies:
            raise UserError(f"--strategies: unknown {bad} (choose from {','.join(STRATEGIES)})")
        if not 0 < s.budget_fraction < 1:
            raise UserError(f"--budget-fraction {s.budget_fraction} must be in (0, 1)")
        return s


def prefix(name: str) -> str:
    """Preprocess output naming: OUT_{key}_document (interfaces: Megatron naming)."""
    return f"data/{name}_text_document"


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8"))


def _num_tokens(workdir: Path, pfx: str) -> int:
    from megacpt.data.indexed import IndexedDataset

    return int(IndexedDataset(workdir / pfx).num_tokens)


def _iters(tokens: int, epochs: float, s: DemoSettings) -> int:
    return max(1, math.ceil(epochs * tokens / (s.global_batch_size * s.seq_length)))


def _train_config(s: DemoSettings, blend: str, save: str, iters: int, lr: float, init_from: str | None) -> dict:
    """One `megacpt train` job: same shape, batch and schedule family for the base and every CPT run."""
    cfg = {
        "model_preset": "tiny",
        "model": {"vocab_size": s.vocab_size, "hidden_size": s.model.hidden_size, "num_layers": s.model.num_layers,
                  "num_heads": s.model.num_heads, "max_position_embeddings": s.seq_length},
        # index caches go with the run (the default, beside the data, would change another stage's outputs)
        "data": {"blend": [blend], "split": "100,0,0", "seq_length": s.seq_length, "tokenizer": "tokenizer",
                 "cache_dir": f"{save}/data-cache"},
        "optimizer": {"lr": lr, "weight_decay": 0.1},
        "scheduler": {"warmup_iters": max(1, round(s.warmup_fraction * iters)), "decay_style": "cosine",
                      "min_lr": lr * s.min_lr_ratio, "warmup_init_lr": 0.0},
        "checkpoint": {"save": save, "keep_last": 1},
        "logging": {"log_interval": max(1, iters // 50), "jsonl": f"{save}/metrics.jsonl"},
        "train": {"train_iters": iters, "micro_batch_size": s.micro_batch_size,
                  "global_batch_size": s.global_batch_size, "seed": s.seed, "device": "cpu", "precision": "fp32"},
    }
    if init_from:
        cfg["checkpoint"]["init_from"] = init_from
    return cfg


def _score_out(metric: str) -> list[str]:
    # a scorer keeps OUT.shards/ of an interrupted run; as a stage output it is cleared before a redo
    return [f"scores/{metric}.parquet", f"scores/{metric}.parquet.shards"]


def _check_finished(workdir: Path, run: str, iters: int) -> None:
    """`megacpt train` exits 0 after a SIGTERM checkpoint too: only a run at its last iteration is done."""
    its = [json.loads(x).get("iteration", 0) for x in
           (workdir / "runs" / run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if max(its, default=0) < iters:
        raise UserError(f"runs/{run} stopped at iteration {max(its, default=0)} of {iters} (interrupted?); "
                        f"run `megacpt demo` again to resume it")


def _write_yaml(path: Path, obj: dict) -> None:
    import yaml

    from megacpt.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------- stages

def build_stages(s: DemoSettings) -> list[Stage]:
    P = s.fingerprint_dict()
    stages: list[Stage] = []

    def corpora(ctx: StageContext) -> dict:
        from megacpt.demo.corpora.build import build_corpora, load_raw

        card = build_corpora(load_raw(s.synthetic, s.seed), ctx.path("corpora"), s.sizes, s.seed)
        return {"origin": card["origin"]}

    stages.append(Stage("corpora", ["corpora"], corpora, params={"synthetic": s.synthetic, "seed": s.seed,
                                                                 "sizes": P["sizes"]}))

    def tokenizer(ctx: StageContext) -> None:
        # the "Pythia tokenizer" of the demo: trained on general text only, like the base model
        ctx.megacpt("tokenizer", "train", "--input", "corpora/general_train.jsonl", "--vocab-size", s.vocab_size,
                    "--out", "tokenizer")

    stages.append(Stage("tokenizer", ["tokenizer"], tokenizer, params={"vocab": s.vocab_size}, deps=["corpora"]))

    def preprocess(ctx: StageContext) -> dict:
        for name in ("general_train", "general_eval", "domain_crawl", "domain_eval"):
            ctx.megacpt("preprocess", "--input", f"corpora/{name}.jsonl", "--output-prefix", f"data/{name}",
                        "--tokenizer-model", "tokenizer", "--append-eod", "--workers", "1", "--quiet")
        return {n: _num_tokens(ctx.workdir, prefix(n)) for n in ("general_train", "domain_crawl")}

    stages.append(Stage("preprocess", ["data"], preprocess, deps=["corpora", "tokenizer"]))

    def pretrain(ctx: StageContext) -> dict:
        iters = _iters(_num_tokens(ctx.workdir, prefix("general_train")), s.base_epochs, s)
        _write_yaml(ctx.path("configs/base.yaml"),
                    _train_config(s, prefix("general_train"), "runs/base", iters, s.base_lr, None))
        ctx.megacpt("train", "--config", "configs/base.yaml")
        _check_finished(ctx.workdir, "base", iters)
        return {"train_iters": iters}

    stages.append(Stage("pretrain-base", ["configs/base.yaml", "runs/base"], pretrain, resumable=True,
                        params={k: P[k] for k in ("model", "seq_length", "micro_batch_size", "global_batch_size",
                                                  "base_epochs", "base_lr", "warmup_fraction", "min_lr_ratio",
                                                  "seed")}, deps=["preprocess"]))

    crawl = prefix("domain_crawl")
    need = sorted({m for st in s.strategies for m in STRATEGY_METRICS.get(st, [])})
    score_stage = {}
    if "perplexity" in need:
        stages.append(Stage("score-perplexity", _score_out("perplexity"), lambda ctx: ctx.megacpt(
            "score", "perplexity", "--model", "runs/base", "--data", crawl, "--seq-length", s.seq_length,
            "--out", "scores/perplexity.parquet", "--device", "cpu", "--dtype", "fp32", "--no-progress"),
            deps=["preprocess", "pretrain-base"]))
        score_stage["perplexity"] = "score-perplexity"
    if "pos_entropy" in need:
        stages.append(Stage("score-pos-entropy", _score_out("pos_entropy"), lambda ctx: ctx.megacpt(
            "score", "pos-entropy", "--data", crawl, "--out", "scores/pos_entropy.parquet", "--workers", "1"),
            deps=["preprocess"]))
        score_stage["pos_entropy"] = "score-pos-entropy"
    if "similarity" in need:
        stages.append(Stage("score-similarity", _score_out("similarity"), lambda ctx: ctx.megacpt(
            "score", "similarity", "--data", crawl, "--task-data", "corpora/task_unlabeled.jsonl",
            "--out", "scores/similarity.parquet", "--device", "cpu", "--max-chunks", s.similarity_max_chunks,
            "--chunk-tokens", s.similarity_chunk_tokens),
            params={"max_chunks": s.similarity_max_chunks, "chunk_tokens": s.similarity_chunk_tokens},
            deps=["preprocess", "corpora"]))
        score_stage["similarity"] = "score-similarity"

    train_data: dict[str, str] = {}
    for st in s.strategies:
        if st == "full":
            train_data[st] = crawl
            continue
        out = f"selections/{st}"
        metrics = STRATEGY_METRICS[st]

        def select(ctx: StageContext, st=st, out=out, metrics=metrics) -> dict:
            scores = ["--scores", *[f"scores/{m}.parquet" for m in metrics]] if metrics else []
            ctx.megacpt("select", "--data", crawl, "--strategy", st, *scores, "--sampling", "hard",
                        "--budget-fraction", s.budget_fraction, "--seed", s.seed, "--output-prefix", f"{out}/selected")
            m = _read_json(ctx.path(f"{out}/selected.manifest.json"))
            return {k: m[k] for k in ("num_selected", "selected_tokens") if k in m}

        stages.append(Stage(f"select-{st}", [out], select, params={"budget": s.budget_fraction, "seed": s.seed},
                            deps=["preprocess", *[score_stage[m] for m in metrics]],
                            volatile=("*.manifest.json", "*.meta.json")))
        train_data[st] = f"{out}/selected"

    selected = [st for st in s.strategies if st != "full"]
    if selected:
        def report_selection(ctx: StageContext) -> None:
            ctx.megacpt("report", "selection", "--manifests",
                        *[f"selections/{st}/selected.manifest.json" for st in selected],
                        "--scores", *[f"scores/{m}.parquet" for m in need], "--out", "selection-report")

        stages.append(Stage("report-selection", ["selection-report"], report_selection,
                            deps=[f"select-{st}" for st in selected] + list(score_stage.values())))

    for st in s.strategies:
        def cpt(ctx: StageContext, st=st) -> dict:
            tokens = _num_tokens(ctx.workdir, train_data[st])
            iters = _iters(tokens, s.cpt_epochs, s)
            _write_yaml(ctx.path(f"configs/cpt-{st}.yaml"),
                        _train_config(s, train_data[st], f"runs/cpt-{st}", iters, s.cpt_lr, "runs/base"))
            ctx.megacpt("train", "--config", f"configs/cpt-{st}.yaml")
            _check_finished(ctx.workdir, f"cpt-{st}", iters)
            return {"train_iters": iters, "dataset_tokens": tokens}

        stages.append(Stage(f"cpt-{st}", [f"configs/cpt-{st}.yaml", f"runs/cpt-{st}"], cpt, resumable=True,
                            params={k: P[k] for k in ("cpt_epochs", "cpt_lr", "warmup_fraction", "min_lr_ratio",
                                                      "seq_length", "micro_batch_size", "global_batch_size", "seed")},
                            deps=["pretrain-base", "preprocess"] + ([] if st == "full" else [f"select-{st}"])))

    for run in ["base", *[f"cpt-{st}" for st in s.strategies]]:
        def evaluate(ctx: StageContext, run=run) -> None:
            model = f"runs/{run}"
            ctx.megacpt("eval", "perplexity", "--model", model, "--tokenizer", "tokenizer",
                        "--data", prefix("domain_eval"), prefix("general_eval"), "--seq-length", s.seq_length,
                        "--bootstrap", s.eval_bootstrap, "--seed", s.seed, "--out", f"evals/{run}/perplexity.json")
            shots = [] if s.eval_shots is None else ["--shots", s.eval_shots]
            ctx.megacpt("eval", "finance", "--model", model, "--tokenizer", "tokenizer",
                        "--tasks", ",".join(TASKS), "--data-dir", "corpora/tasks", *shots,
                        "--bootstrap", s.eval_bootstrap, "--seed", s.seed, "--out", f"evals/{run}/finance.json")

        stages.append(Stage(f"eval-{run}", [f"evals/{run}"], evaluate,
                            params={"shots": s.eval_shots, "bootstrap": s.eval_bootstrap, "seed": s.seed},
                            deps=["preprocess", "corpora", "pretrain-base" if run == "base" else run]))
    return stages


# ------------------------------------------------------------------------------------------- results

def _loss_curve(workdir: Path, run: str) -> list[tuple[int, float]]:
    path = workdir / "runs" / run / "metrics.jsonl"
    out: dict[int, float] = {}  # a resumed run appends: the last record of an iteration wins
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if r.get("kind") == "train" and r.get("loss") is not None:
            out[int(r["iteration"])] = float(r["loss"])
    return sorted(out.items())


def _tokens_trained(workdir: Path, run: str, seq_length: int) -> int:
    """From the run's own log: samples consumed x sequence length (what the trainer really did)."""
    consumed = [json.loads(x).get("consumed_samples") for x in
                (workdir / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    consumed = [c for c in consumed if c is not None]
    if not consumed:
        raise UserError(f"runs/{run}/metrics.jsonl has no consumed_samples record")
    return int(max(consumed)) * seq_length


def collect_results(workdir: Path, s: DemoSettings, summary: list[dict]):
    from megacpt.demo.report import DemoResults, RunResult

    stages = {x["name"]: x for x in summary}
    runs = []
    for run in ["base", *[f"cpt-{st}" for st in s.strategies]]:
        ppl = _read_json(workdir / "evals" / run / "perplexity.json")["tasks"]
        fin = _read_json(workdir / "evals" / run / "finance.json")["tasks"]
        name = run.removeprefix("cpt-")
        sel_docs = sel_tokens = None
        if run != "base":
            if name == "full":
                from megacpt.data.indexed import IndexedDataset

                ds = IndexedDataset(workdir / prefix("domain_crawl"))
                sel_docs, sel_tokens = int(ds.num_documents), int(ds.num_tokens)
            else:
                from megacpt.data.indexed import IndexedDataset

                ds = IndexedDataset(workdir / f"selections/{name}/selected")
                sel_docs, sel_tokens = int(ds.num_documents), int(ds.num_tokens)
        runs.append(RunResult(
            name=name,
            tokens_trained=0 if run == "base" else _tokens_trained(workdir, run, s.seq_length),
            selected_docs=sel_docs, selected_tokens=sel_tokens,
            domain_ppl=float(ppl[f"ppl:{Path(prefix('domain_eval')).name}"]["value"]),
            general_ppl=float(ppl[f"ppl:{Path(prefix('general_eval')).name}"]["value"]),
            task_score=float(fin[PRIMARY_TASK]["value"]),
            task_extra={f"{t} {r['metric']}": float(r["value"]) for t, r in fin.items() if t != PRIMARY_TASK},
            wall_s=float(stages.get("pretrain-base" if run == "base" else run, {}).get("wall_s", 0.0)),
            loss_curve=_loss_curve(workdir, run),
        ))
    sources = [json.loads(x)["source"] for x in
               (workdir / "corpora" / "domain_crawl.jsonl").read_text(encoding="utf-8").splitlines()]
    picked: dict[str, dict[str, int]] = {"(whole crawl)": dict(sorted(Counter(sources).items()))}
    for st in s.strategies:
        if st != "full":
            ids = _read_json(workdir / f"selections/{st}/selected.manifest.json")["selected_doc_ids"]
            picked[st] = dict(sorted(Counter(sources[i] for i in ids).items()))
    srep = workdir / "selection-report"
    card = _read_json(workdir / "corpora" / "corpora.json")
    return DemoResults(
        title="megacpt demo: data selection for domain-adaptive continual pre-training at toy scale",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), origin=card["origin"], seed=s.seed,
        budget_fraction=s.budget_fraction, runs=runs,
        stages=[{"name": x["name"], "wall_s": x["wall_s"], "cpu_s": x.get("cpu_s"), "peak_rss_mb": x["peak_rss_mb"],
                 "skipped": x["skipped"]} for x in summary],
        corpora=card,
        settings={"model": f"GPT-NeoX {s.model.num_layers}L/{s.model.hidden_size}H/{s.model.num_heads} heads, "
                           f"vocab {s.vocab_size} (BPE trained on the general corpus)",
                  "sequence length": s.seq_length, "global batch": s.global_batch_size,
                  "base": f"{s.base_epochs:g} epoch(s) of general_train, peak LR {s.base_lr:g}, cosine",
                  "CPT": f"{s.cpt_epochs:g} epoch(s) of each dataset from the base, peak LR {s.cpt_lr:g}, "
                         f"warm-up {s.warmup_fraction:.0%}, cosine to {s.min_lr_ratio:g}x",
                  "selection": "hard top-k by percentile-rank score to the token budget; random: seeded",
                  "mode": "quick" if s.quick else "default"},
        selection_plots=sorted(str(p.relative_to(workdir)) for p in srep.glob("*.png")),
        selection_report="selection-report/report.md" if (srep / "report.md").exists() else None,
        selection_sources=picked,
    )


def run_demo(workdir: Path, s: DemoSettings, force: bool = False, echo=print) -> Path:
    """Run (or resume) every stage, then write the report; returns ``workdir``/report.md."""
    from megacpt.demo.report import write_report

    import os

    workdir.mkdir(parents=True, exist_ok=True)
    n = str(s.threads)
    env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": str(s.seed)}
    if s.in_process:
        os.environ.update(env)
        import torch

        torch.set_num_threads(s.threads)
    runner = StageRunner(workdir, force=force, env=env, echo=echo, in_process=s.in_process)
    t0 = time.perf_counter()
    summary = runner.run(build_stages(s))
    res = collect_results(workdir, s, summary)
    md, _ = write_report(res, workdir)
    wall = time.perf_counter() - t0
    peak = max(x["peak_rss_mb"] for x in summary)
    ran = [x for x in summary if not x["skipped"]]
    echo(f"demo finished in {wall:.1f}s ({len(ran)} stages ran, CPU {sum(x.get('cpu_s') or 0 for x in ran):.0f}s; "
         f"{len(summary) - len(ran)} skipped); peak RSS {peak:.0f} MB; report: {md}")
    for r in res.runs:
        echo(f"  {r.name:<9} tokens {r.tokens_trained:>9,}  domain ppl {r.domain_ppl:8.2f}  "
             f"general ppl {r.general_ppl:8.2f}  task F1 {r.task_score:.3f}")
    return md
