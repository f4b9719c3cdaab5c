"""Label-likelihood scoring (`megacpt eval finance`'s classification path) vs lm-eval-harness's HF method.

Both paths score the same requests (a k-shot-sized prompt + each of 3 label verbalisations) with the same
weights (a Pythia-70M-shaped GPT-NeoX, random weights, vocab 50,304), in length-sorted batches of the same
size, in one process, rounds interleaved:

  baseline  HF GPTNeoXForCausalLM(ids).logits -> log_softmax over [b, s, V] -> gather the label tokens,
            one sequence per (prompt, label) (what lm-eval's HFLM does for loglikelihood requests)
  megacpt   EvalLM.loglikelihood (what `eval finance` runs): single-token labels from one next-token
            distribution per prompt; longer labels through sequence_nll (fused output layer on the label
            positions only)

``--label-tokens 1`` (default) is the FPB/FiQA/Headline case with Pythia's tokenizer (" positive",
" negative", " neutral", " Yes", " No" are single tokens); ``--label-tokens 3`` uses labels of 1, 2 and
3 tokens. Token ids stand in for text (a stub tokenizer reads "12 7 99" as [12, 7, 99]).

    python benchmarks/eval_label_likelihood.py [--label-tokens 1|3] [--examples 16] [--prompt-len 256] [--batch 8]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="pythia-70m")
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label-tokens", type=int, default=1, choices=[1, 3])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from _eval_models import hf_and_megacpt, id_tokenizer

    from megacpt.eval.lm import EvalLM

    cfg, hf, model = hf_and_megacpt(args.preset)

    rng = np.random.default_rng(0)
    seqs, starts = [], []
    for _ in range(args.examples):
        prompt = rng.integers(2, cfg.vocab_size, int(rng.integers(args.prompt_len // 2, args.prompt_len))).tolist()
        for n_label in ((1, 1, 1) if args.label_tokens == 1 else (1, 2, 3)):  # three labels
            seqs.append(prompt + rng.integers(2, cfg.vocab_size, n_label).tolist())
            starts.append(len(prompt))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    n_tok = sum(map(len, seqs))

    @torch.inference_mode()
    def baseline() -> list[float]:
        out = [0.0] * len(seqs)
        for b in range(0, len(order), args.batch):
            idx = order[b:b + args.batch]
            s = max(len(seqs[i]) for i in idx)
            ids = torch.zeros(len(idx), s, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            logp = torch.log_softmax(hf(ids).logits, dim=-1)  # [b, s, V]
            for r, i in enumerate(idx):
                pos = torch.arange(starts[i], len(seqs[i]))
                out[i] = float(logp[r, pos - 1, ids[r, pos]].double().sum())
        return out

    lm = EvalLM(model, id_tokenizer(cfg.padded_vocab()), max_length=cfg.max_position_embeddings, batch_size=args.batch)
    requests = [(" ".join(map(str, x[:st])), " " + " ".join(map(str, x[st:]))) for x, st in zip(seqs, starts)]

    def ours() -> list[float]:
        return [ll for ll, _ in lm.loglikelihood(requests)]

    times = {"baseline": [], "megacpt": []}
    vals = {}
    for _ in range(args.rounds):
        for name, fn in (("baseline", baseline), ("megacpt", ours)):
            t0 = time.perf_counter()
            vals[name] = fn()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    diff = max(abs(a - b) for a, b in zip(vals["baseline"], vals["megacpt"]))
    print(f"preset {args.preset}, {len(seqs)} requests ({n_tok} tokens), labels of {args.label_tokens} token(s) max, "
          f"batch {args.batch}, {args.threads} threads")
    for k in ("baseline", "megacpt"):
        print(f"  {k:9s} {len(seqs) / best[k]:8.2f} requests/s  {n_tok / best[k]:9.0f} tokens/s  (best of {args.rounds})")
    print(f"  megacpt / baseline: {best['baseline'] / best['megacpt']:.2f}x   max |loglik diff|: {diff:.2e}")


if __name__ == "__main__":
    main()
