"""Greedy generation (`megacpt eval finance`'s NER path): EvalLM.greedy_generate (KV cache, left-padded
batches) vs HF ``generate`` with its KV cache, and vs HF ``generate(use_cache=False)`` (re-running the whole
sequence every step, what EvalLM did before it had a cache). Same random Pythia-70M-shaped weights, same
prompts (token ids stand in for text), same batch size, greedy, rounds interleaved in one process.

    python benchmarks/generation.py [--examples 16] [--prompt-len 384] [--new-tokens 48] [--batch 8]
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
    ap.add_argument("--prompt-len", type=int, default=384)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-uncached", action="store_true", help="skip the (slow) no-cache baseline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from _eval_models import hf_and_megacpt, id_tokenizer

    from megacpt.eval.lm import EvalLM

    cfg, hf, model = hf_and_megacpt(args.preset)

    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, int(rng.integers(args.prompt_len // 2, args.prompt_len))).tolist()
               for _ in range(args.examples)]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    lm = EvalLM(model, id_tokenizer(cfg.padded_vocab()), max_length=cfg.max_position_embeddings, batch_size=args.batch)

    def ours() -> list[str]:
        return lm.greedy_generate([" ".join(map(str, p)) for p in prompts], args.new_tokens)

    @torch.inference_mode()
    def hf_generate(use_cache: bool) -> list[str]:
        out = [""] * len(prompts)
        for b in range(0, len(order), args.batch):
            idx = order[b:b + args.batch]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]):] = 1
            gen = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                              use_cache=use_cache, pad_token_id=0, eos_token_id=0)[:, width:]
            for r, i in enumerate(idx):
                toks = gen[r].tolist()
                out[i] = " ".join(map(str, toks[: toks.index(0)] if 0 in toks else toks))
        return out

    paths = [("megacpt", ours), ("hf-cache", lambda: hf_generate(True))]
    if not args.no_uncached:
        paths.append(("hf-no-cache", lambda: hf_generate(False)))
    times = {k: [] for k, _ in paths}
    outs = {}
    for _ in range(args.rounds):
        for name, fn in paths:
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    n_new = sum(len(x.split()) for x in outs["megacpt"])
    same = sum(a == b for a, b in zip(outs["megacpt"], outs["hf-cache"]))
    print(f"preset {args.preset}, {len(prompts)} prompts of {args.prompt_len // 2}-{args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens max, batch {args.batch}, {args.threads} threads; "
          f"outputs equal to HF's: {same}/{len(prompts)}")
    for k in best:
        print(f"  {k:12s} {n_new / best[k]:8.1f} new tokens/s  ({best[k]:.2f} s, best of {args.rounds})")
    print(f"  megacpt / hf-cache: {best['hf-cache'] / best['megacpt']:.2f}x"
          + (f"   megacpt / hf-no-cache: {best['hf-no-cache'] / best['megacpt']:.2f}x" if "hf-no-cache" in best else ""))


if __name__ == "__main__":
    main()
