"""`megacpt eval finance|perplexity|compare|convert-data|lm-eval`: thin entry points over megacpt.eval."""
from __future__ import annotations

import argparse

from megacpt.config import DTYPES, add_dtype_argument
from megacpt.errors import UserError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF GPT-NeoX dir or megacpt checkpoint dir")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir/file (default: the one shipped with --model)")
    add_dtype_argument(p, "fp32", choices=tuple(DTYPES), help="dtype the model is loaded and run in")
    p.add_argument("--device", default="cpu")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--seq-length", type=int, default=None, help="max tokens per sequence (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CI (0: none)")
    p.add_argument("--out", required=True, help="results JSON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="{finance,perplexity,probe,compare,convert-data,lm-eval}")
    f = sub.add_parser("finance", help="FPB / FiQA SA / Headline / NER / custom classification tasks")
    _model_args(f)
    f.add_argument("--tasks", default="fpb,fiqa_sa,headline,ner", help="comma-separated task names")
    f.add_argument("--data-dir", required=True, help="DIR/<task>/{train,test}.jsonl (+ optional task.yaml)")
    f.add_argument("--shots", default=None, metavar="K|TASK=K,...",
                   help="k-shot for every task (5), per task (ner=20,fpb=5) or both (5,ner=20); "
                        "default: each task's own (BloombergGPT: NER 20, others 5)")
    f.add_argument("--shot-seeds", type=int, default=1, metavar="K",
                   help="score each task with K shot draws (seeds seed..seed+K-1): value = mean over draws, "
                        "reported with their sd beside the bootstrap CI (default 1)")
    f.add_argument("--ner-types", default=None, metavar="T,T,...",
                   help="NER protocol: entity types kept (default PER,ORG,LOC as BloombergGPT; add MISC to keep it)")
    f.add_argument("--ner-sentences", default=None, choices=["with-entities", "all"],
                   help="NER protocol: evaluate only sentences with a kept entity (default, BloombergGPT) or all")
    f.add_argument("--label-scoring", default="sum", choices=["sum", "mean", "contextual", "pmi"],
                   help="compare summed (default) or per-token mean log-probs of label verbalisations, or "
                        "calibrated ones: contextual calibration, domain-conditional PMI (docs/method.md §3)")
    f.add_argument("--predictions", action="store_true",
                   help="also keep per-example predictions in the results JSON (they are always written to "
                        "OUT.predictions.jsonl with gold, prediction and label scores)")
    p = sub.add_parser("perplexity", help="token-weighted perplexity on held-out indexed datasets")
    _model_args(p)
    p.add_argument("--data", nargs="+", required=True, metavar="PREFIX", help="indexed dataset prefixes")
    p.add_argument("--max-documents", type=int, default=None, help="score only the first N documents of each")
    pr = sub.add_parser("probe", help="linear probe on frozen features of classification tasks (macro-F1)")
    _model_args(pr)
    pr.add_argument("--tasks", required=True, help="comma-separated classification task names")
    pr.add_argument("--data-dir", required=True, help="DIR/<task>/{train,test}.jsonl (+ optional task.yaml)")
    pr.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    pr.add_argument("--predictions", action="store_true", help="keep per-example predictions in the JSON")
    c = sub.add_parser("compare", help="markdown table + PNG bar plot of several results JSONs")
    c.add_argument("results", nargs="+")
    c.add_argument("--names", default=None, help="comma-separated column names (default: model dir names)")
    c.add_argument("--out-md", default=None)
    c.add_argument("--out-png", default=None)
    d = sub.add_parser("convert-data", help="original FPB/FiQA/Headline/CoNLL files -> DIR/<task>/{train,test}.jsonl")
    d.add_argument("--task", required=True, choices=["fpb", "fiqa_sa", "headline", "ner"])
    d.add_argument("--input", nargs="+", required=True, help="original file(s) (train, or everything to split)")
    d.add_argument("--test-input", nargs="*", default=[], help="original test file(s); else a seeded split")
    d.add_argument("--test-fraction", type=float, default=0.2)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out-dir", required=True)
    h = sub.add_parser("lm-eval", help="run lm-eval-harness (--model hf) on an HF export, local tasks included")
    h.add_argument("--model", required=True, help="HF model dir (`megacpt convert megacpt-to-hf` output)")
    h.add_argument("--tasks", default=None, help="lm-eval task names, comma-separated")
    h.add_argument("--preset", default=None, choices=["finpythia-open-domain"],
                   help="the paper's open-domain tasks (arc_challenge, hellaswag, mmlu, truthfulqa_mc2) with the "
                        "Open LLM Leaderboard's few-shot counts (25, 10, 5, 0); --num-fewshot TASK=K changes one")
    h.add_argument("--num-fewshot", default=None, metavar="K|TASK=K,...",
                   help="few-shot examples: K for every task (lm-eval's --num_fewshot) or per task/group "
                        "(arc_challenge=25,hellaswag=10); default: each task's config")
    h.add_argument("--include-path", default=None, help="dir of custom task YAMLs")
    h.add_argument("--micro-batch-size", type=int, default=1)
    add_dtype_argument(h, "fp32", choices=tuple(DTYPES), help="dtype lm-eval loads the model in")
    h.add_argument("--device", default="cpu")
    h.add_argument("--limit", type=int, default=None)
    h.add_argument("--log-samples", action="store_true", help="keep per-sample log-likelihoods (lm-eval --log_samples)")
    h.add_argument("--out", required=True, help="lm-eval output dir")


def run(args: argparse.Namespace) -> int:
    from megacpt.io import check_writable_dir, write_json_atomic

    cmd = args.eval_command
    if cmd == "convert-data":
        from megacpt.eval.originals import convert

        rep = convert(args.task, args.input, args.out_dir, test_inputs=args.test_input,
                      test_fraction=args.test_fraction, seed=args.seed)
        for f in rep["inputs"]:
            dup = f", {f['duplicates_of_earlier_files']} duplicates of earlier files dropped" \
                if f["duplicates_of_earlier_files"] else ""
            print(f"[eval] {f['path']}: {f['format']}, {f['encoding']}, {f['rows']} examples{dup}")
        for line in rep["skipped"][:10]:
            print(f"[eval] skipped {line}")
        if len(rep["skipped"]) > 10:
            print(f"[eval] ... {len(rep['skipped']) - 10} more skipped rows (all listed in source.json)")
        for note in rep["notes"]:
            print(f"[eval] note: {note}")
        print(f"[eval] {args.task}: wrote {rep['train']} train / {rep['test']} test examples to "
              f"{args.out_dir}/{args.task} ({len(rep['skipped'])} rows skipped)")
        return 0
    if cmd == "compare":
        from megacpt.eval.compare import compare

        names = [n.strip() for n in args.names.split(",")] if args.names else None
        print(compare(args.results, names, args.out_md, args.out_png), end="")
        return 0
    if cmd == "lm-eval":
        from megacpt.eval.lm_eval_adapter import parse_num_fewshot, run_lm_eval

        tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
        res = run_lm_eval(args.model, tasks, args.out, include_path=args.include_path,
                          batch_size=args.micro_batch_size, device=args.device, dtype=args.dtype, limit=args.limit,
                          log_samples=args.log_samples, num_fewshot=parse_num_fewshot(args.num_fewshot),
                          preset=args.preset)
        shots = (res.get("megacpt") or {}).get("num_fewshot", {})
        for t, r in res.get("results", {}).items():
            print(f"[eval] lm-eval {t} ({shots.get(t, '?')}-shot): "
                  + ", ".join(f"{k}={v:.4f}" for k, v in r.items() if isinstance(v, float)))
        if res:
            print(f"[eval] lm-eval {res['megacpt']['lm_eval_version']}: results in {args.out}/results.json")
        return 0
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap {args.bootstrap} must be >= 0")
    check_writable_dir(args.out)
    from megacpt.eval.lm import load_eval_lm

    def load():
        return load_eval_lm(args.model, tokenizer_path=args.tokenizer, dtype=args.dtype, device=args.device,
                            batch_size=args.micro_batch_size, max_length=args.seq_length)

    if cmd == "finance":
        from megacpt.eval.finance import (FinanceConfig, load_tasks, one_line_table, parse_shots, run_finance, task_list,
                                          write_run)

        shots, task_shots = parse_shots(args.shots)
        cfg = FinanceConfig(tasks=task_list(args.tasks), data_dir=args.data_dir, shots=shots, task_shots=task_shots,
                            seed=args.seed, label_scoring=args.label_scoring, bootstrap=args.bootstrap,
                            predictions=args.predictions, shot_seeds=args.shot_seeds,
                            ner_types=tuple(t.strip().upper() for t in args.ner_types.split(",") if t.strip())
                            if args.ner_types is not None else None,
                            ner_include_empty=None if args.ner_sentences is None else args.ner_sentences == "all")
        tasks = load_tasks(cfg)  # bad task data fails here, before the model is loaded
        run = run_finance(load(), cfg, tasks)
        pred = write_run(run, args.out)
        print(f"[eval] per-example predictions: {pred}")
        print(one_line_table(run.results))
        return 0
    if cmd == "probe":
        from megacpt.eval.finance import one_line_table, task_list
        from megacpt.eval.probe import ProbeConfig, run_probe

        cfg = ProbeConfig(task_list(args.tasks), args.data_dir, C=args.C, seed=args.seed, bootstrap=args.bootstrap,
                          max_tokens=args.seq_length, predictions=args.predictions)
        results = run_probe(load(), cfg)
        write_json_atomic(args.out, results)
        print(one_line_table(results))
        return 0
    from megacpt.eval.finance import one_line_table, results_document
    from megacpt.eval.perplexity import heldout_perplexity

    lm = load()
    tasks = heldout_perplexity(lm, args.data, args.seq_length or lm.max_length, args.max_documents,
                               n_boot=args.bootstrap, seed=args.seed)
    results = results_document(lm, {"data": args.data, "seq_length": args.seq_length or lm.max_length,
                                     "max_documents": args.max_documents, "bootstrap": args.bootstrap}, tasks)
    write_json_atomic(args.out, results)
    print(one_line_table(results))
    return 0


# command name -> (add its arguments, run it); dispatched by megacpt.cli
COMMANDS = {"eval": (add_arguments, run)}
