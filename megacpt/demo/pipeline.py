"""The embedded study: FinPythia's data-selection experiment end to end at toy scale, as resumable stages.

corpora -> tokenizer -> preprocess -> base pre-training on general text to a plateau (cached by content
hash across work dirs) -> scores of the domain crawl under the base (perplexity, POS entropy, task
similarity) -> selections -> CPT of the base on each, for every seed -> evaluation of every model ->
compute-matched arms (the strategy that is best on the validation split, and random, trained as long as
the full corpus) -> report (docs/method.md §4).

Arms of the main experiment (the in-domain crawl), each for every seed:
``full`` (vanilla DACP; = random at 100%), ``random-10/25/50`` (the random-budget curve),
``<strategy>-hard`` and ``<strategy>-soft`` at the budget for ets, eta-ppl, eta-ent, combined,
``matched-<best>`` and ``matched-random-10`` (the budget's subsets trained for as many steps as full).
The noisy-crawl ablation (the crawl plus off-domain noise) runs ``noisy-full``, ``noisy-random-10`` and
``noisy-<strategy>-hard``. A seed sets the training order and, for random and soft subsets, the draw.

Every stage except building the corpora and writing the report is a public `megacpt` command: the demo
is the integration test of the system, not a second implementation. Where the commands run (this
process, a pool of worker processes, or one child process each) is StageRunner's choice (stages.py).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megacpt.demo.corpora.build import TASKS, CorpusSizes
from megacpt.demo.stages import Stage, StageContext
from megacpt.errors import UserError
from megacpt.io import atomic_path, sha256_file

SELECTION_STRATEGIES = ("ets", "eta-ppl", "eta-ent", "combined")
BASELINES = ("random", "full")
STRATEGIES = SELECTION_STRATEGIES + BASELINES     # what --strategies accepts (the baselines always run)
# strategy -> the metrics it ranks by (docs/method.md §2): ETS = similarity, ETA = novelty / diversity
STRATEGY_METRICS = {"ets": ["similarity"], "eta-ppl": ["perplexity"], "eta-ent": ["pos_entropy"],
                    "combined": ["similarity", "perplexity", "pos_entropy"]}
HELDOUT = ("domain_eval", "domain_val", "general_eval", "task_inputs_eval")
CRAWLS = {"": "domain_crawl", "noisy-": "domain_crawl_noisy"}


@dataclass
class ModelShape:
    # sized for the 30-minute budget on the slowest 2-core class seen (AVX2, no AVX-512: fp32 GEMMs at
    # ~20-28 GFLOP/s a core); 128 x 3 took ~55 min there (docs/benchmarks.md)
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4


@dataclass
class CostRates:
    """Predicted CPU seconds per 1,000 tokens (an idle 2-core x86 CPU, one thread; for the ETA only)."""

    train: float = 0.13
    forward: float = 0.045
    pos_entropy: float = 0.06
    similarity: float = 0.1


@dataclass
class DemoSettings:
    """Every number that determines the demo's results (all of it goes into the stage fingerprints)."""

    seed: int = 1234
    n_seeds: int = 3
    synthetic: bool = False
    quick: bool = False
    budget_fraction: float = 0.1
    random_fractions: tuple[float, ...] = (0.1, 0.25, 0.5)   # + 1.0 = full
    strategies: tuple[str, ...] = SELECTION_STRATEGIES
    samplings: tuple[str, ...] = ("hard", "soft")
    compute_matched: bool = True
    ablation: bool = True                 # the noisy-crawl ablation
    sizes: CorpusSizes = field(default_factory=CorpusSizes)
    vocab_size: int = 4096
    model: ModelShape = field(default_factory=ModelShape)
    seq_length: int = 256
    micro_batch_size: int = 16
    global_batch_size: int = 16
    base_epochs: float = 2.0        # passes over general_train (the report shows the held-out curve and plateau check)
    base_lr: float = 3e-3
    base_eval_points: int = 10      # held-out losses logged along the base's training
    cpt_epochs: float = 1.0         # passes over each CPT dataset (full: the whole crawl)
    cpt_lr: float = 1e-3            # CPT re-warms to a lower peak than pre-training (docs/method.md §1)
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    eval_bootstrap: int = 100       # per-model CIs of the eval commands (the report's are stats_bootstrap)
    stats_bootstrap: int = 400      # test-set resamples of the report's paired intervals
    probe_C: float = 1.0
    label_scoring: str = "contextual"
    # margins of the verdicts, fixed before any run (docs/method.md §4.3)
    ppl_margin: float = math.log(1.02)   # nats/token: 2% perplexity
    task_margin: float = 0.02            # macro-F1 points
    # MiniLM costs ~2 x 22M FLOPs per token: embedding whole documents would dominate the demo on a CPU,
    # so each document is represented by its first window(s) of this many tokens (the lead of a news text)
    similarity_chunk_tokens: int = 64
    similarity_max_chunks: int = 1
    # How the work runs; left out of the fingerprints (results do not depend on it).
    jobs: int = 2
    threads: int = 1
    in_process: bool = True
    cost: CostRates = field(default_factory=CostRates)

    def fingerprint_dict(self) -> dict:
        d = asdict(self)
        for k in ("jobs", "threads", "in_process", "cost"):
            d.pop(k)
        return d

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n_seeds)]

    @classmethod
    def make(cls, quick: bool, **kw) -> "DemoSettings":
        if quick:
            kw = {"sizes": CorpusSizes.quick(), "vocab_size": 2048, "model": ModelShape(64, 2, 4), "seq_length": 128,
                  "micro_batch_size": 8, "global_batch_size": 8, "base_epochs": 2.0, "base_eval_points": 8,
                  "n_seeds": 2, "random_fractions": (0.1, 0.5), "strategies": ("ets", "eta-ppl"),
                  "eval_bootstrap": 50, "stats_bootstrap": 100, "similarity_chunk_tokens": 32, **kw}
        s = cls(quick=quick, **kw)
        bad = [x for x in s.strategies if x not in STRATEGIES]
        if bad:
            raise UserError(f"--strategies: unknown {bad} (choose from {','.join(STRATEGIES)})")
        s.strategies = tuple(x for x in s.strategies if x in SELECTION_STRATEGIES)
        if not 0 < s.budget_fraction < 1:
            raise UserError(f"--budget-fraction {s.budget_fraction} must be in (0, 1)")
        if s.n_seeds < 1:
            raise UserError(f"--seeds {s.n_seeds} must be >= 1 (3 or more for intervals worth reading)")
        s.random_fractions = tuple(sorted({*s.random_fractions, s.budget_fraction}))
        return s


# ------------------------------------------------------------------------------------------- arms

def pct(f: float) -> str:
    return f"{100 * f:g}"


@dataclass(frozen=True)
class Arm:
    """One CPT configuration of the study; trained once per seed."""

    name: str                  # "full", "random-10", "ets-soft", "matched-random-10", "noisy-ets-hard", ...
    crawl: str                 # "" (main) or "noisy-"
    strategy: str              # random | full | ets | ...
    sampling: str = ""         # hard | soft ("" for the baselines)
    fraction: float = 1.0      # share of the crawl's tokens selected
    matched: bool = False      # trained for as many steps as the full arm (compute-matched)

    @property
    def group(self) -> str:
        return "ablation" if self.crawl else "main"

    def selection(self, seed: int) -> str | None:
        """Selection prefix (relative) of this arm for ``seed``; None for the full crawl."""
        if self.strategy == "full":
            return None
        if self.strategy == "random":
            return f"selections/{self.crawl}random-{pct(self.fraction)}/s{seed}/selected"
        if self.sampling == "hard":     # deterministic: one selection for every seed
            return f"selections/{self.crawl}{self.strategy}-hard/selected"
        return f"selections/{self.crawl}{self.strategy}-soft/s{seed}/selected"


def study_arms(s: DemoSettings) -> list[Arm]:
    """Every arm except the compute-matched ones (decided after the evaluations)."""
    arms = [Arm("full", "", "full")]
    arms += [Arm(f"random-{pct(f)}", "", "random", fraction=f) for f in s.random_fractions]
    arms += [Arm(f"{st}-{sm}", "", st, sm, s.budget_fraction) for st in s.strategies for sm in s.samplings]
    if s.ablation:
        b = s.budget_fraction
        arms += [Arm("noisy-full", "noisy-", "full"), Arm(f"noisy-random-{pct(b)}", "noisy-", "random", fraction=b)]
        arms += [Arm(f"noisy-{st}-hard", "noisy-", st, "hard", b) for st in s.strategies]
    return arms


def matched_arms(s: DemoSettings, best: Arm | None) -> list[Arm]:
    if not s.compute_matched:
        return []
    b = s.budget_fraction
    out = [Arm(f"matched-random-{pct(b)}", "", "random", fraction=b, matched=True)]
    if best is not None:
        out.insert(0, Arm(f"matched-{best.name}", "", best.strategy, best.sampling, b, matched=True))
    return out


def run_dir(arm: str, seed: int | None) -> str:
    return "runs/base" if arm == "base" else f"runs/{arm}/s{seed}"


def eval_dir(arm: str, seed: int | None) -> str:
    return "evals/base" if arm == "base" else f"evals/{arm}/s{seed}"


def prefix(name: str) -> str:
    """Preprocess output naming: OUT_{key}_document (interfaces: Megatron naming)."""
    return f"data/{name}_text_document"


def read_json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8"))


def num_tokens(workdir: Path, pfx: str) -> int:
    from megacpt.data.indexed import IndexedDataset

    return int(IndexedDataset(workdir / pfx).num_tokens)


def iters_for(tokens: int, epochs: float, s: DemoSettings) -> int:
    return max(1, math.ceil(epochs * tokens / (s.global_batch_size * s.seq_length)))


def train_config(s: DemoSettings, blend: str, save: str, iters: int, lr: float, seed: int,
                 init_from: str | None, eval_prefixes: dict | None = None, eval_interval: int = 0) -> dict:
    """One `megacpt train` job: same shape, batch and schedule family for the base and every CPT run."""
    cfg = {
        "model_preset": "tiny",
        "model": {"vocab_size": s.vocab_size, "hidden_size": s.model.hidden_size, "num_layers": s.model.num_layers,
                  "num_heads": s.model.num_heads, "max_position_embeddings": s.seq_length},
        # index caches go with the run (the default, beside the data, would change another stage's outputs)
        "data": {"blend": [blend], "split": "100,0,0", "seq_length": s.seq_length, "tokenizer": "tokenizer",
                 "cache_dir": f"{save}/data-cache", **({"eval_prefixes": eval_prefixes} if eval_prefixes else {})},
        "optimizer": {"lr": lr, "weight_decay": 0.1},
        "scheduler": {"warmup_iters": max(1, round(s.warmup_fraction * iters)), "decay_style": "cosine",
                      "min_lr": lr * s.min_lr_ratio, "warmup_init_lr": 0.0},
        "checkpoint": {"save": save, "keep_last": 1},
        "logging": {"log_interval": max(1, iters // 50), "jsonl": f"{save}/metrics.jsonl",
                    "eval_interval": eval_interval, "eval_iters": 1000},
        "train": {"train_iters": iters, "micro_batch_size": s.micro_batch_size,
                  "global_batch_size": s.global_batch_size, "seed": seed, "device": "cpu", "precision": "fp32"},
    }
    if init_from:
        cfg["checkpoint"]["init_from"] = init_from
    return cfg


def check_finished(workdir: Path, run: str, iters: int) -> None:
    """`megacpt train` exits 0 after a SIGTERM checkpoint too: only a run at its last iteration is done."""
    its = [json.loads(x).get("iteration", 0) for x in
           (workdir / run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if max(its, default=0) < iters:
        raise UserError(f"{run} stopped at iteration {max(its, default=0)} of {iters} (interrupted?); "
                        f"run `megacpt demo` again to resume it")


def write_yaml(path: Path, obj: dict) -> None:
    import yaml

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")


def base_cache_root() -> Path:
    root = os.environ.get("MEGACPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megacpt")
    return Path(root) / "bases"


def base_cache_key(workdir: Path, cfg: dict) -> str:
    """Content hash of everything the base model depends on: its job config and the bytes it reads."""
    import megacpt

    files = [f"{prefix(n)}.{ext}" for n in ("general_train", "general_eval", "domain_eval") for ext in ("bin", "idx")]
    files += sorted(str(p.relative_to(workdir)) for p in (workdir / "tokenizer").rglob("*") if p.is_file())
    blob = {"config": cfg, "files": {f: sha256_file(workdir / f) for f in files}, "megacpt": megacpt.__version__}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def _score_out(out: str) -> list[str]:
    # a scorer keeps OUT.shards/ of an interrupted run; as a stage output it is cleared before a redo
    return [out, f"{out}.shards"]


# ------------------------------------------------------------------------------------------- stages

class StudyPlan:
    """Builds the stage list; the compute-matched stages read the evaluations to choose their strategy."""

    def __init__(self, s: DemoSettings, workdir: Path):
        self.s, self.workdir = s, workdir
        self.P = s.fingerprint_dict()
        self.stages: list[Stage] = []
        self.crawl_tokens_guess = 0

    def add(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        return stage

    # -- cost model (predicted CPU seconds, for the ETA) ------------------------------------------------
    def _tokens(self, name: str, fallback_words: int) -> int:
        if not (self.workdir / f"{prefix(name)}.idx").exists():
            return int(1.4 * fallback_words)
        try:
            return num_tokens(self.workdir, prefix(name))
        except (OSError, ValueError, UserError):   # being written by the preprocess stage
            return int(1.4 * fallback_words)

    def _words(self, name: str) -> int:
        try:
            return read_json(self.workdir / "corpora" / "corpora.json")["files"][name]["words"]
        except (OSError, KeyError, ValueError):
            return {"general_train": 1_000_000, "domain_crawl": 180_000, "domain_crawl_noisy": 300_000}.get(name, 30_000)

    def _train_cost(self, name: str, epochs_or_fraction: float) -> float:
        return self.s.cost.train * self._tokens(name, self._words(name)) * epochs_or_fraction / 1000

    def _eval_cost(self) -> float:
        tok = sum(self._tokens(n, self._words(n)) for n in HELDOUT)
        tasks = sum(self._words(f"tasks/{t}/{sp}") for t in TASKS for sp in ("train", "test"))
        return 2 + self.s.cost.forward * (tok + 6 * tasks) / 1000

    # -- stages ---------------------------------------------------------------------------------------
    def build(self) -> list[Stage]:
        self._prepare()
        self._pretrain()
        for crawl in CRAWLS if self.s.ablation else [""]:
            self._scores(crawl)
        arms = study_arms(self.s)
        self._selections(arms)
        self._selection_reports(arms)
        for arm in arms:
            for seed in self.s.seeds:
                self._cpt(arm, seed)
        self.add(self._eval_stage("base", None, ["pretrain-base"]))
        for arm in arms:
            for seed in self.s.seeds:
                self.add(self._eval_stage(arm.name, seed, [f"cpt-{arm.name}-s{seed}"]))
        self._compute_matched(arms)
        return self.stages

    def _prepare(self) -> None:
        s = self.s

        def corpora(ctx: StageContext) -> dict:
            from megacpt.demo.corpora.build import build_corpora, load_raw

            card = build_corpora(load_raw(s.synthetic, s.seed), ctx.path("corpora"), s.sizes, s.seed)
            return {"origin": card["origin"]}

        self.add(Stage("corpora", ["corpora"], corpora, params={"synthetic": s.synthetic, "seed": s.seed,
                                                                "sizes": self.P["sizes"]}, cost=5))

        def tokenizer(ctx: StageContext) -> None:
            # the "Pythia tokenizer" of the demo: trained on general text only, like the base model
            ctx.megacpt("tokenizer", "train", "--input", "corpora/general_train.jsonl", "--vocab-size", s.vocab_size,
                        "--out", "tokenizer")

        self.add(Stage("tokenizer", ["tokenizer"], tokenizer, params={"vocab": s.vocab_size}, deps=["corpora"],
                       cost=lambda: 3 + self._words("general_train") / 400_000))
        names = ["general_train", *HELDOUT, "domain_crawl", *(["domain_crawl_noisy"] if s.ablation else [])]

        def preprocess(ctx: StageContext) -> dict:
            for name in names:
                ctx.megacpt("preprocess", "--input", f"corpora/{name}.jsonl", "--output-prefix", f"data/{name}",
                            "--tokenizer-model", "tokenizer", "--append-eod", "--workers", "1", "--quiet")
            return {n: num_tokens(ctx.workdir, prefix(n)) for n in names}

        self.add(Stage("preprocess", ["data"], preprocess, deps=["corpora", "tokenizer"],
                       cost=lambda: 2 + sum(self._words(n) for n in names) / 300_000))

    def _pretrain(self) -> None:
        s = self.s

        def pretrain(ctx: StageContext) -> dict:
            iters = iters_for(num_tokens(ctx.workdir, prefix("general_train")), s.base_epochs, s)
            cfg = train_config(s, prefix("general_train"), "runs/base", iters, s.base_lr, s.seed, None,
                               eval_prefixes={"general": prefix("general_eval"), "domain": prefix("domain_eval")},
                               eval_interval=max(1, iters // s.base_eval_points))
            write_yaml(ctx.path("configs/base.yaml"), cfg)
            cached = base_cache_root() / base_cache_key(ctx.workdir, cfg)
            if (cached / "COMPLETE").exists() and not (ctx.workdir / "runs/base").exists():
                shutil.copytree(cached / "base", ctx.workdir / "runs/base")
                check_finished(ctx.workdir, "runs/base", iters)
                return {"train_iters": iters, "from_cache": str(cached)}
            # every later stage needs the base, so for most of its run it is the only stage: it gets all the
            # demo's cores (--jobs) instead of one, else one core idles for ~10 minutes of the default run
            ctx.megacpt("train", "--config", "configs/base.yaml", threads=max(s.threads, s.jobs))
            check_finished(ctx.workdir, "runs/base", iters)
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(ctx.workdir / "runs/base", tmp / "base")
            (tmp / "COMPLETE").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            shutil.rmtree(cached, ignore_errors=True)
            os.replace(tmp, cached)
            return {"train_iters": iters, "cached_to": str(cached)}

        self.add(Stage("pretrain-base", ["configs/base.yaml", "runs/base"], pretrain, resumable=True,
                       params={k: self.P[k] for k in ("model", "seq_length", "micro_batch_size", "global_batch_size",
                                                      "base_epochs", "base_lr", "base_eval_points", "warmup_fraction",
                                                      "min_lr_ratio", "seed")}, deps=["preprocess"],
                       cost=lambda: self._train_cost("general_train", s.base_epochs)
                       + s.base_eval_points * s.cost.forward * 100))

    def _scores(self, crawl: str) -> None:
        s = self.s
        data = prefix(CRAWLS[crawl])
        need = sorted({m for st in s.strategies for m in STRATEGY_METRICS[st]})
        words = lambda: self._words(CRAWLS[crawl])  # noqa: E731
        if "perplexity" in need:
            out = f"scores/{crawl}perplexity.parquet"
            self.add(Stage(f"score-{crawl}perplexity", _score_out(out), lambda ctx, out=out: ctx.megacpt(
                "score", "perplexity", "--model", "runs/base", "--data", data, "--seq-length", s.seq_length,
                "--out", out, "--device", "cpu", "--dtype", "fp32", "--no-progress"),
                deps=["preprocess", "pretrain-base"], cost=lambda: s.cost.forward * 1.4 * words() / 1000))
        if "pos_entropy" in need:
            out = f"scores/{crawl}pos_entropy.parquet"
            self.add(Stage(f"score-{crawl}pos-entropy", _score_out(out), lambda ctx, out=out: ctx.megacpt(
                "score", "pos-entropy", "--data", data, "--out", out, "--workers", "1", fresh=True),
                deps=["preprocess"], cost=lambda: 4 + s.cost.pos_entropy * 1.4 * words() / 1000))
        if "similarity" in need:
            out = f"scores/{crawl}similarity.parquet"
            self.add(Stage(f"score-{crawl}similarity", _score_out(out), lambda ctx, out=out: ctx.megacpt(
                "score", "similarity", "--data", data, "--task-data", "corpora/task_unlabeled.jsonl",
                "--out", out, "--device", "cpu", "--max-chunks", s.similarity_max_chunks,
                "--chunk-tokens", s.similarity_chunk_tokens, fresh=True),
                params={"max_chunks": s.similarity_max_chunks, "chunk_tokens": s.similarity_chunk_tokens},
                deps=["preprocess", "corpora"], cost=lambda: 6 + s.cost.similarity * words() / 1000))

    def _score_stage(self, crawl: str, metric: str) -> str:
        return f"score-{crawl}{metric.replace('_', '-')}"

    def _selections(self, arms: list[Arm]) -> None:
        s, made = self.s, set()
        for arm in arms:
            for seed in s.seeds:
                out = arm.selection(seed)
                if out is None or out in made:
                    continue
                made.add(out)
                metrics = STRATEGY_METRICS.get(arm.strategy, [])
                sel_seed = s.seed if arm.sampling == "hard" else seed

                def select(ctx: StageContext, arm=arm, out=out, metrics=metrics, sel_seed=sel_seed) -> dict:
                    scores = ["--scores", *[f"scores/{arm.crawl}{m}.parquet" for m in metrics]] if metrics else []
                    sampling = ["--sampling", arm.sampling] if arm.sampling else []
                    ctx.megacpt("select", "--data", prefix(CRAWLS[arm.crawl]), "--strategy", arm.strategy, *scores,
                                *sampling, "--budget-fraction", arm.fraction, "--seed", sel_seed,
                                "--output-prefix", out)
                    m = read_json(ctx.path(f"{out}.manifest.json"))
                    return {k: m["budget"][k] for k in ("achieved_documents", "achieved_tokens")}

                self.add(Stage(self._select_stage(out), [str(Path(out).parent)], select,
                               params={"fraction": arm.fraction, "seed": sel_seed, "sampling": arm.sampling},
                               deps=["preprocess", *[self._score_stage(arm.crawl, m) for m in metrics]],
                               volatile=("*.manifest.json", "*.meta.json"), cost=1.5))

    @staticmethod
    def _select_stage(out: str) -> str:
        return "select-" + str(Path(out).parent).removeprefix("selections/").replace("/", "-")

    def _selection_reports(self, arms: list[Arm]) -> None:
        s = self.s
        for crawl in CRAWLS if s.ablation else [""]:
            # the first seed's selections: hard, soft and random of the same budget side by side
            outs = [a.selection(s.seeds[0]) for a in arms if a.crawl == crawl and a.strategy != "full"
                    and a.fraction == s.budget_fraction]
            if not outs:
                continue
            need = sorted({m for st in s.strategies for m in STRATEGY_METRICS[st]})
            name = f"{crawl}selection-report"

            def report(ctx: StageContext, outs=outs, need=need, name=name, crawl=crawl) -> None:
                ctx.megacpt("report", "selection", "--manifests", *[f"{o}.manifest.json" for o in outs],
                            "--scores", *[f"scores/{crawl}{m}.parquet" for m in need], "--out", name)

            self.add(Stage(f"report-{name}", [name], report, deps=[self._select_stage(o) for o in outs],
                           cost=4))

    def _cpt(self, arm: Arm, seed: int) -> None:
        s = self.s
        run = run_dir(arm.name, seed)
        data = arm.selection(seed) or prefix(CRAWLS[arm.crawl])
        record = f"configs/{arm.name}-s{seed}.json"   # the full arms' step counts, read by compute-matched arms

        def cpt(ctx: StageContext) -> dict:
            from megacpt.io import write_json_atomic

            tokens = num_tokens(ctx.workdir, data)
            iters = iters_for(tokens, s.cpt_epochs, s)
            write_yaml(ctx.path(f"configs/{arm.name}-s{seed}.yaml"),
                       train_config(s, data, run, iters, s.cpt_lr, seed, "runs/base"))
            ctx.megacpt("train", "--config", f"configs/{arm.name}-s{seed}.yaml")
            check_finished(ctx.workdir, run, iters)
            info = {"train_iters": iters, "dataset_tokens": tokens}
            if arm.strategy == "full":
                write_json_atomic(ctx.path(record), info)
            return info

        outputs = [f"configs/{arm.name}-s{seed}.yaml", run] + ([record] if arm.strategy == "full" else [])
        sel = arm.selection(seed)
        self.add(Stage(f"cpt-{arm.name}-s{seed}", outputs, cpt, resumable=True,
                       params={**{k: self.P[k] for k in ("cpt_epochs", "cpt_lr", "warmup_fraction", "min_lr_ratio",
                                                         "seq_length", "micro_batch_size", "global_batch_size")},
                               "arm": asdict(arm), "seed": seed},
                       deps=["pretrain-base", "preprocess", *([self._select_stage(sel)] if sel else [])],
                       cost=lambda: self._train_cost(CRAWLS[arm.crawl], arm.fraction * s.cpt_epochs)))

    def _eval_stage(self, arm: str, seed: int | None, deps: list[str]) -> Stage:
        s = self.s
        model, out = run_dir(arm, seed), eval_dir(arm, seed)

        def evaluate(ctx: StageContext) -> None:
            for name in HELDOUT:
                ctx.megacpt("score", "perplexity", "--model", model, "--data", prefix(name), "--seq-length",
                            s.seq_length, "--out", f"{out}/{name}.parquet", "--device", "cpu", "--dtype", "fp32",
                            "--no-progress")
            tasks = ",".join(TASKS)
            ctx.megacpt("eval", "probe", "--model", model, "--tokenizer", "tokenizer", "--tasks", tasks,
                        "--data-dir", "corpora/tasks", "--C", s.probe_C, "--bootstrap", s.eval_bootstrap,
                        "--seed", s.seed, "--predictions", "--out", f"{out}/probe.json")
            ctx.megacpt("eval", "finance", "--model", model, "--tokenizer", "tokenizer", "--tasks", tasks,
                        "--data-dir", "corpora/tasks", "--label-scoring", s.label_scoring, "--bootstrap",
                        s.eval_bootstrap, "--seed", s.seed, "--predictions", "--out", f"{out}/finance.json")

        return Stage(f"eval-{arm}" + ("" if seed is None else f"-s{seed}"), [out], evaluate,
                     params={k: self.P[k] for k in ("eval_bootstrap", "probe_C", "label_scoring", "seq_length",
                                                    "seed")}, deps=["preprocess", "corpora", *deps],
                     volatile=(f"{out}/*.json",), cost=self._eval_cost)

    def _compute_matched(self, arms: list[Arm]) -> None:
        """The strategy with the lowest mean domain_val NLL over seeds, and random, at full's step count."""
        s = self.s
        if not s.compute_matched:
            return
        candidates = [a for a in arms if a.crawl == "" and a.strategy in SELECTION_STRATEGIES]
        choose_deps = [f"eval-{a.name}-s{sd}" for a in candidates for sd in s.seeds]

        def choose(ctx: StageContext) -> dict:
            from megacpt.io import write_json_atomic

            means = {a.name: float(sum(heldout_nll(ctx.workdir, a.name, sd, "domain_val") for sd in s.seeds)
                                   / len(s.seeds)) for a in candidates}
            best = min(means, key=means.get) if means else None
            write_json_atomic(ctx.path("configs/best-strategy.json"),
                              {"best": best, "domain_val_nll": means, "rule": "lowest mean domain_val NLL over seeds"})
            return {"best": best}

        self.add(Stage("choose-best-strategy", ["configs/best-strategy.json"], choose, deps=choose_deps, cost=0.5))
        for seed in s.seeds:
            for slot in (("best",) if candidates else ()) + ("random",):
                self._matched_stage(slot, seed)

    def _matched_stage(self, slot: str, seed: int) -> None:
        """A compute-matched arm whose strategy is read at run time from configs/best-strategy.json."""
        s = self.s
        name = f"matched-{slot}-s{seed}"

        def resolve(ctx: StageContext) -> Arm:
            best = read_json(ctx.path("configs/best-strategy.json"))["best"]
            if slot == "random":
                return matched_arms(s, None)[-1]
            if best is None:
                raise UserError("no selection strategy ran: no compute-matched best arm")
            st, sm = best.rsplit("-", 1)
            return Arm(f"matched-{best}", "", st, sm, s.budget_fraction, matched=True)

        def cpt(ctx: StageContext) -> dict:
            arm = resolve(ctx)
            data = arm.selection(seed)
            iters = read_json(ctx.path(f"configs/full-s{seed}.json"))["train_iters"]
            run = f"runs/matched-{slot}/s{seed}"
            cfg = train_config(s, data, run, iters, s.cpt_lr, seed, "runs/base")
            write_yaml(ctx.path(f"configs/{name}.yaml"), cfg)
            ctx.megacpt("train", "--config", f"configs/{name}.yaml")
            check_finished(ctx.workdir, run, iters)
            return {"arm": arm.name, "train_iters": iters, "dataset_tokens": num_tokens(ctx.workdir, data)}

        sel_deps = sorted({self._select_stage(a.selection(seed)) for a in study_arms(s)
                           if a.crawl == "" and a.fraction == s.budget_fraction and a.selection(seed)})
        self.add(Stage(f"cpt-{name}", [f"configs/{name}.yaml", f"runs/matched-{slot}/s{seed}"], cpt, resumable=True,
                       params={"slot": slot, "seed": seed, "cpt_lr": s.cpt_lr},
                       deps=["choose-best-strategy", f"cpt-full-s{seed}", "pretrain-base", *sel_deps],
                       cost=lambda: self._train_cost("domain_crawl", s.cpt_epochs)))
        self.add(self._eval_stage(f"matched-{slot}", seed, [f"cpt-{name}"]))


def heldout_nll(workdir: Path, arm: str, seed: int | None, name: str) -> float:
    """Token-weighted NLL (nats/token) of a model on one held-out set, from its per-document scores."""
    from megacpt.score.files import read_scores

    cols = read_scores(workdir / eval_dir(arm, seed) / f"{name}.parquet").columns
    return float(cols["nll_sum"].sum() / max(int(cols["n_pred"].sum()), 1))


def build_stages(s: DemoSettings, workdir: Path) -> list[Stage]:
    return StudyPlan(s, workdir).build()
