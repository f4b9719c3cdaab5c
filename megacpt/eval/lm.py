"""The model side of evaluation: label log-likelihoods (batched) and batched greedy generation.

The model is megacpt's plain ``GPTNeoX`` (``megacpt.convert.load_model`` reads HF dirs and megacpt
checkpoints). Single-token continuations are read from one next-token distribution per context; longer
ones go through the scoring pass's library (``megacpt.score.nll.sequence_nll``: length-sorted
batches, fused output layer, no [tokens x vocab] logits), so eval and the novelty scorer compute NLL with
one piece of code. Probabilities are over the real vocabulary only
(``model.cfg.vocab_size``, set to the tokenizer's when the checkpoint only knows the padded row count).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from megacpt.config import torch_dtype_name
from megacpt.errors import UserError


@dataclass
class LMInfo:
    """What produced the scores (recorded in results JSON)."""

    model_path: str
    vocab_size: int
    padded_vocab_size: int
    max_length: int
    dtype: str
    tokenizer: dict


class EvalLM:
    """Batched scoring/generation over a model + tokenizer. ``batch_size`` counts sequences per forward."""

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int, batch_size: int = 8,
                 info: LMInfo | None = None):
        padded = model.embed_out.weight.shape[0]
        if tokenizer.vocab_size > padded:
            raise UserError(f"tokenizer vocab {tokenizer.vocab_size} does not fit the model's {padded} embedding "
                            "rows: the tokenizer does not belong to this model")
        if model.cfg.vocab_size not in (padded, tokenizer.vocab_size):
            raise UserError(f"model vocab_size {model.cfg.vocab_size} does not match the tokenizer's "
                            f"{tokenizer.vocab_size}: the tokenizer does not belong to this model")
        model.cfg.padded_vocab_size = padded          # keep the row count fixed, then
        model.cfg.vocab_size = tokenizer.vocab_size  # rows past the tokenizer's vocab are padding
        self.model = model.eval()
        self.tok = tokenizer
        # right/left padding id: never attended, so any id works; EOD where the tokenizer has one
        self.pad_id = tokenizer.eod if tokenizer.eod is not None else 0
        self.vocab_size = tokenizer.vocab_size
        self.max_length = max_length
        self.batch_size = max(1, batch_size)
        self.device = model.embed_out.weight.device
        self.info = info
        self.n_truncated = 0

    # -- tokenization ---------------------------------------------------------------------------------
    def split_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval-harness convention: encode(context + continuation) split at len(encode(context)), so the
        continuation tokens are those the model actually sees after this context."""
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        if whole[: len(ctx)] != ctx:  # a merge across the boundary: score the continuation on its own
            cont = self.tok.encode(continuation)
        else:
            cont = whole[len(ctx):]
        if not cont:
            raise UserError(f"continuation {continuation!r} encodes to no token")
        return (ctx or [self._start_token()]), cont

    def _start_token(self) -> int:
        """What an empty context is conditioned on: EOD (lm-eval's convention for the prefix token)."""
        if self.tok.eod is None:
            raise UserError("an empty context needs an end-of-document token to condition on, and the tokenizer "
                            "has none")
        return self.tok.eod

    def _fit(self, ids: list[int], keep_last: int) -> list[int]:
        """Left-truncate to the model's length (keeping the scored tail); counted in ``n_truncated``."""
        if len(ids) <= keep_last:
            return ids
        self.n_truncated += 1
        return ids[-keep_last:]

    def _forward_hidden(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """Right-padded batch -> hidden [b, s, H]; causal attention makes trailing pad harmless."""
        s = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), s), self.pad_id, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        return self.model.hidden_states(ids.to(self.device))

    @torch.inference_mode()
    def next_token_logits(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """fp32 logits [n, vocab_size] of the token after each sequence (real vocab only), batched."""
        w = self.model.embed_out.weight[: self.vocab_size].float()
        out = torch.empty(len(seqs), self.vocab_size, dtype=torch.float32)
        for b in range(0, len(seqs), self.batch_size):
            batch = seqs[b:b + self.batch_size]
            hidden = self._forward_hidden(batch)
            last = hidden[torch.arange(len(batch)), torch.tensor([len(x) - 1 for x in batch])]  # [b, H]
            out[b:b + len(batch)] = (last.float() @ w.T).cpu()
        return out

    # -- scoring --------------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """(sum of log-probs of the continuation tokens, number of them) per (context, continuation).

        Single-token continuations that share a context (the usual label set: " positive"/" negative"/
        " neutral", " Yes"/" No") are read from one next-token distribution per context, so the prompt is
        run once, not once per label. Longer continuations go through the scoring pass's
        ``sequence_nll``. Sequences longer than ``max_length`` lose context tokens on the left (counted in
        ``n_truncated``).
        """
        from megacpt.score.nll import ScoringConfig, sequence_nll

        out: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
        single: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # context -> [(request, token)]
        # (sequence, first target) -> [request]: identical requests are scored once (contextual calibration
        # asks the same content-free prompts for every query of a 0-shot task)
        multi: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for r, (ctx, cont) in enumerate(requests):
            c, t = self.split_tokens(ctx, cont)
            if len(t) == 1:
                single.setdefault(tuple(self._fit(c, self.max_length - 1)), []).append((r, t[0]))
                continue
            x = self._fit(c + t, self.max_length)
            multi.setdefault((tuple(x), max(1, len(x) - len(t))), []).append(r)
        if single:
            ctxs = sorted(single, key=len, reverse=True)  # length-sorted batches: little padding
            logp = torch.log_softmax(self.next_token_logits([list(c) for c in ctxs]).double(), -1)
            for row, c in enumerate(ctxs):
                for r, tok in single[c]:
                    out[r] = (float(logp[row, tok]), 1)
        if multi:
            cfg = ScoringConfig(seq_length=self.max_length, micro_batch_size=self.batch_size)
            keys = list(multi)
            for key, (n, nll) in zip(keys, sequence_nll(self.model, [list(x) for x, _ in keys], self.max_length, cfg,
                                                          target_starts=[st for _, st in keys])):
                for r in multi[key]:
                    out[r] = (-nll, n)
        return out

    # -- generation -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def greedy_generate(self, prompts: Sequence[str], max_new_tokens: int, stop: str = "\n") -> list[str]:
        """Batched greedy decoding with a KV cache. Prompts are length-sorted into batches of
        ``batch_size``, left-padded, prefilled once, then decoded one token per row per step (padding is
        never attended, positions count real tokens). A row ends at ``stop``, EOD or ``max_new_tokens``;
        the text before ``stop`` is returned. Only real-vocabulary tokens are ever generated."""
        from megacpt.model.gpt_neox import KVCache

        if max_new_tokens >= self.max_length:
            raise UserError(f"max_new_tokens {max_new_tokens} must be < the model's length {self.max_length}")
        seqs = [self._fit(self.tok.encode(p) or [self._start_token()], self.max_length - max_new_tokens)
                for p in prompts]
        texts = [""] * len(prompts)
        w = self.model.embed_out.weight[: self.vocab_size].float()                       # [V, H]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
        for b in range(0, len(order), self.batch_size):
            rows = order[b:b + self.batch_size]
            width = max(len(seqs[i]) for i in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            valid = torch.zeros(len(rows), width, dtype=torch.bool)
            for r, i in enumerate(rows):
                ids[r, width - len(seqs[i]):] = torch.tensor(seqs[i], dtype=torch.long)
                valid[r, width - len(seqs[i]):] = True
            cache = KVCache(self.model, len(rows), width + max_new_tokens)
            h = self.model.forward_cached(ids.to(self.device), cache, valid.to(self.device))[:, -1]   # [n, H]
            gen: list[list[int]] = [[] for _ in rows]
            active = [True] * len(rows)
            for step in range(max_new_tokens):
                nxt = (h.float() @ w.T).argmax(-1)                                                # [n]
                for r, t in enumerate(nxt.tolist()):
                    if not active[r]:
                        continue
                    if t == self.tok.eod:
                        active[r] = False
                        continue
                    gen[r].append(t)
                    texts[rows[r]] = self.tok.decode(gen[r])
                    active[r] = stop not in texts[rows[r]]
                if not any(active) or step == max_new_tokens - 1:
                    break
                h = self.model.forward_cached(nxt[:, None], cache)[:, -1]  # finished rows idle along
        return [t.split(stop, 1)[0] for t in texts]


def load_eval_lm(model_path: str, *, tokenizer_path: str | None = None, dtype: str = "float32",
                 device: str = "cpu", batch_size: int = 8, max_length: int | None = None) -> EvalLM:
    """Model (HF GPT-NeoX dir or megacpt checkpoint) + its tokenizer, checked to belong together."""
    from megacpt.data.tokenizer import load_tokenizer

    dtype = torch_dtype_name(dtype)  # fp32/bf16/fp16 or an alias -> torch's name (recorded in the results)
    torch_dtype = getattr(torch, dtype)
    if not Path(model_path).exists():
        raise UserError(f"--model {model_path}: no such file or directory")
    from megacpt.convert import load_model

    model, cfg = load_model(model_path, dtype=torch_dtype, device=device)
    tok_path = tokenizer_path or _find_tokenizer(model_path)
    if tok_path is None:
        raise UserError(f"--model {model_path} ships no tokenizer: pass --tokenizer")
    tok = load_tokenizer(tok_path)
    max_length = max_length or cfg.max_position_embeddings
    info = LMInfo(model_path=str(model_path), vocab_size=tok.vocab_size, padded_vocab_size=cfg.padded_vocab(),
                  max_length=max_length, dtype=dtype, tokenizer=tok.identity())
    return EvalLM(model, tok, max_length=max_length, batch_size=batch_size, info=info)


def _find_tokenizer(path: str) -> str | None:
    from megacpt.convert import find_tokenizer

    found = find_tokenizer(path)
    if found:
        return found
    p = Path(path)
    for cand in (p, p / "tokenizer"):
        if (cand / "tokenizer.json").is_file() or (cand / "tokenizer.model").is_file():
            return os.fspath(cand)
    return None
