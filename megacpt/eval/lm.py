"""The model side of evaluation: label log-likelihoods (batched) and batched greedy generation.

Works on any model with ``hidden_states(input_ids [b, s]) -> [b, s, H]`` and ``embed_out.weight [V_pad, H]``
(megacpt's plain ``GPTNeoX``; an HF ``GPTNeoXForCausalLM`` through ``HFModelAdapter``). Probabilities are
over the tokenizer's real vocabulary only: padded embedding rows (index >= vocab_size) are excluded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from megacpt.errors import UserError


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token NLL [N] of ``targets`` [N] under logits ``hidden [N, H] @ weight[:vocab_size].T``.

    The single call site of the scoring path: the kernel helper's fused linear cross-entropy (never builds
    the [N, V] logits) when it is installed, else a chunked fp32 torch computation of the same quantity.
    """
    try:
        from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    except ImportError:
        fused_linear_cross_entropy = None
    if fused_linear_cross_entropy is not None:
        return fused_linear_cross_entropy(hidden, weight, targets, reduction="none", vocab_size=vocab_size).float()
    w = weight[:vocab_size].float()
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for i in range(0, targets.shape[0], 2048):  # bound the [rows, V] logits buffer
        logits = hidden[i:i + 2048].float() @ w.T
        out[i:i + 2048] = torch.logsumexp(logits, -1) - logits.gather(1, targets[i:i + 2048, None]).squeeze(1)
    return out


class HFModelAdapter(nn.Module):
    """An HF ``GPTNeoXForCausalLM`` seen through megacpt's model interface."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        self.embed_out = hf_model.get_output_embeddings()  # "embed_out" in transformers 4, "lm_head" in 5

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf.gpt_neox(input_ids=input_ids, position_ids=position_ids).last_hidden_state


@dataclass
class LMInfo:
    """What produced the scores (recorded in results JSON)."""

    model_path: str
    loader: str
    vocab_size: int
    padded_vocab_size: int
    max_length: int
    dtype: str
    tokenizer: dict


class EvalLM:
    """Batched scoring/generation over a model + tokenizer. ``batch_size`` counts sequences per forward."""

    def __init__(self, model: nn.Module, tokenizer, *, vocab_size: int, max_length: int, batch_size: int = 8,
                 info: LMInfo | None = None):
        padded = model.embed_out.weight.shape[0]
        if tokenizer.vocab_size > padded:
            raise UserError(f"tokenizer vocab {tokenizer.vocab_size} does not fit the model's {padded} embedding "
                            "rows: the tokenizer does not belong to this model")
        self.model = model.eval()
        self.tok = tokenizer
        self.vocab_size = vocab_size
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
        return (ctx or [self.tok.eod]), cont

    def _fit(self, ids: list[int], keep_last: int) -> list[int]:
        """Left-truncate to the model's length (keeping the scored tail); counted in ``n_truncated``."""
        if len(ids) <= keep_last:
            return ids
        self.n_truncated += 1
        return ids[-keep_last:]

    def _forward_hidden(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """Right-padded batch -> hidden [b, s, H]; causal attention makes trailing pad harmless."""
        s = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), s), self.tok.eod, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        return self.model.hidden_states(ids.to(self.device))

    # -- scoring --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """(sum of log-probs of the continuation tokens, number of continuation tokens) per (context,
        continuation), computed in length-sorted batches."""
        toks = []
        for ctx, cont in requests:
            c, t = self.split_tokens(ctx, cont)
            toks.append((self._fit(c + t, self.max_length + 1), len(t)))
        order = sorted(range(len(toks)), key=lambda i: -len(toks[i][0]))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(toks)
        w = self.model.embed_out.weight
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            # inputs are all tokens but the last; position p predicts token p + 1
            seqs = [toks[i][0] for i in idx]
            hidden = self._forward_hidden([x[:-1] for x in seqs])  # [b, s, H]
            rows, cols, tgt, owner = [], [], [], []
            for r, (i, x) in enumerate(zip(idx, seqs)):
                n_cont = min(toks[i][1], len(x) - 1)
                first = len(x) - 1 - n_cont
                rows += [r] * n_cont
                cols += range(first, len(x) - 1)
                tgt += x[first + 1:]
                owner += [r] * n_cont
            h = hidden[torch.tensor(rows), torch.tensor(cols)]  # [N, H]
            nll = token_nll(h, w, torch.tensor(tgt, device=self.device), self.vocab_size)
            sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, torch.tensor(owner), nll.double().cpu())
            for r, i in enumerate(idx):
                out[i] = (-float(sums[r]), min(toks[i][1], len(toks[i][0]) - 1))
        return out

    # -- generation -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def greedy_generate(self, prompts: Sequence[str], max_new_tokens: int, stop: str = "\n") -> list[str]:
        """Batched greedy decoding without a KV cache (each step re-runs the right-padded batch; rows grow
        independently). A row ends at ``stop``, EOD or ``max_new_tokens``; the text before ``stop`` is
        returned."""
        if max_new_tokens >= self.max_length:
            raise UserError(f"max_new_tokens {max_new_tokens} must be < the model's length {self.max_length}")
        seqs = [self._fit(self.tok.encode(p) or [self.tok.eod], self.max_length - max_new_tokens) for p in prompts]
        gen: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        active = list(range(len(prompts)))
        w = self.model.embed_out.weight[: self.vocab_size]
        for _ in range(max_new_tokens):
            if not active:
                break
            still = []
            for b in range(0, len(active), self.batch_size):
                idx = active[b:b + self.batch_size]
                batch = [seqs[i] + gen[i] for i in idx]
                hidden = self._forward_hidden(batch)
                last = hidden[torch.arange(len(idx)), torch.tensor([len(x) - 1 for x in batch])]  # [b, H]
                nxt = (last.float() @ w.float().T).argmax(-1).tolist()
                for i, t in zip(idx, nxt):
                    if t == self.tok.eod:
                        continue
                    gen[i].append(t)
                    texts[i] = self.tok.decode(gen[i])
                    if stop not in texts[i]:
                        still.append(i)
            active = still
        return [t.split(stop, 1)[0] for t in texts]


def load_eval_lm(model_path: str, *, tokenizer_path: str | None = None, dtype: str = "float32",
                 device: str = "cpu", batch_size: int = 8, max_length: int | None = None) -> EvalLM:
    """Model (HF GPT-NeoX dir or megacpt checkpoint) + its tokenizer, checked to belong together."""
    from megacpt.data.tokenizer import load_tokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    if not Path(model_path).exists():
        raise UserError(f"--model {model_path}: no such file or directory")
    model, cfg_vocab, max_pos, loader = _load_model(model_path, torch_dtype, device)
    tok_path = tokenizer_path or _find_tokenizer(model_path)
    if tok_path is None:
        raise UserError(f"--model {model_path} ships no tokenizer: pass --tokenizer")
    tok = load_tokenizer(tok_path)
    padded = model.embed_out.weight.shape[0]
    if cfg_vocab is not None and cfg_vocab != padded and cfg_vocab != tok.vocab_size:
        raise UserError(f"model vocab_size {cfg_vocab} does not match tokenizer {tok_path} vocab {tok.vocab_size}")
    info = LMInfo(model_path=str(model_path), loader=loader, vocab_size=tok.vocab_size, padded_vocab_size=padded,
                  max_length=max_length or max_pos, dtype=dtype, tokenizer=tok.identity())
    return EvalLM(model, tok, vocab_size=tok.vocab_size, max_length=max_length or max_pos,
                  batch_size=batch_size, info=info)


def _load_model(path: str, dtype: torch.dtype, device: str):
    """(model, real vocab or None, max positions, loader name). megacpt.convert.load_model when present."""
    try:
        from megacpt.convert import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        model, cfg = load_model(path, dtype=dtype, device=device)
        # an HF dir's config has only the padded row count; the tokenizer then decides the real vocab
        real = cfg.vocab_size if cfg.vocab_size != cfg.padded_vocab() else None
        return model, real, cfg.max_position_embeddings, "megacpt.convert.load_model"
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"--model {path}: not an HF model dir (no config.json), and megacpt.convert is unavailable")
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return HFModelAdapter(hf), None, hf.config.max_position_embeddings, "transformers.GPTNeoXForCausalLM"


def _find_tokenizer(path: str) -> str | None:
    try:
        from megacpt.convert import find_tokenizer
    except ImportError:
        find_tokenizer = None
    if find_tokenizer is not None:
        found = find_tokenizer(path)
        if found:
            return found
    p = Path(path)
    for cand in (p, p / "tokenizer"):
        if (cand / "tokenizer.json").is_file() or (cand / "tokenizer.model").is_file():
            return os.fspath(cand)
    return None
