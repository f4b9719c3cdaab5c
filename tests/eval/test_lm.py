"""Scoring/generation against brute-force HF forward passes, and label likelihood on a biased model."""
import pytest
import torch

from megacpt.eval.lm import load_eval_lm
from megacpt.eval.prompts import Template
from megacpt.eval.tasks import classify


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_eval_lm(str(model_dir), batch_size=3)


def _hf(lm):
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(lm.info.model_path).eval()


def test_loglikelihood_matches_unbatched_full_logits(lm):
    hf = _hf(lm)
    reqs = [("Profits rose sharply", " positive"), ("Shares fell.", " negative result"),
            ("Revenue was flat and the board kept the dividend", " neutral"), ("Gold", " prices climbed on Monday"),
            ("Profits rose sharply", " negative"), ("Shares fell.", "x"),
            ("Shares fell.", " negative result")]  # a repeated request is scored once, answered for both
    got = lm.loglikelihood(reqs)
    assert got[1] == got[-1]
    n_tokens = [len(lm.split_tokens(c, t)[1]) for c, t in reqs]
    assert 1 in n_tokens and max(n_tokens) > 1  # both the next-token path and sequence_nll are exercised
    for (ctx, cont), (ll, n) in zip(reqs, got):
        c, t = lm.split_tokens(ctx, cont)
        ids = torch.tensor([c + t])
        with torch.no_grad():
            logits = hf(ids).logits[0, :, : lm.vocab_size]  # padded rows excluded
        logp = torch.log_softmax(logits.double(), -1)
        ref = sum(float(logp[len(c) - 1 + j, tok]) for j, tok in enumerate(t))
        assert n == len(t)
        assert ll == pytest.approx(ref, abs=1e-4)


def test_greedy_generation_batched_equals_unbatched(lm, model_dir):
    prompts = ["Gold prices", "The agreement between Acme", "Shares"]
    batched = lm.greedy_generate(prompts, max_new_tokens=6)
    one = load_eval_lm(str(model_dir), batch_size=1)
    assert batched == one.greedy_generate(prompts, max_new_tokens=6)
    hf = _hf(lm)  # reference: argmax over the real vocab, full re-forward each step (no cache, no padding)
    for prompt, got in zip(prompts, batched):
        ids = lm.tok.encode(prompt)
        out = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(hf(torch.tensor([ids + out])).logits[0, -1, : lm.vocab_size].argmax())
            if nxt == lm.tok.eod:
                break
            out.append(nxt)
            if "\n" in lm.tok.decode(out):
                break
        assert got == lm.tok.decode(out).split("\n", 1)[0]


@pytest.mark.parametrize("scoring", ["sum", "mean"])
def test_label_likelihood_picks_the_label_the_model_is_biased_to(lm, scoring):
    """A hand-built model whose output always favours the tokens of one verbalisation picks that label."""
    biased = load_eval_lm(lm.info.model_path, batch_size=4)
    m = biased.model
    with torch.no_grad():  # constant hidden state e: final LayerNorm weight 0, bias e
        m.final_layer_norm.weight.zero_()
        m.final_layer_norm.bias.zero_()
        m.final_layer_norm.bias[0] = 1.0
    verbal = {"negative": "negative", "neutral": "neutral", "positive": "positive"}
    t = Template(example="{text}\nAnswer: {answer}")
    queries = [{"text": "Profits rose."}, {"text": "Shares fell."}, {"text": "Flat."}]
    shots = [[({"text": "Gold climbed."}, "positive")]] * 3
    for target in verbal:
        toks = biased.split_tokens("Answer:", " " + verbal[target])[1]
        with torch.no_grad():  # logit 30 everywhere for the target's tokens (they may share a prefix token)
            m.embed_out.weight.zero_()
            m.embed_out.weight[toks, 0] = 30.0
        assert classify(biased, t, queries, shots, verbal, scoring) == [target] * 3
    # padded rows never count: a huge logit on a padding row changes nothing
    with torch.no_grad():
        m.embed_out.weight[lm.vocab_size + 5, 0] = 1e4
    assert classify(biased, t, queries, shots, verbal, scoring) == ["positive"] * 3


def test_long_prompts_are_cut_on_the_left_and_counted(lm, model_dir):
    short = load_eval_lm(str(model_dir), batch_size=2, max_length=12)
    hf = _hf(lm)
    ctx = "The agreement between Acme Holdings and Jane Doe was signed in London, and gold prices climbed"
    multi = next(w for w in (" Monday", " climbed", " prices") if 1 < len(short.split_tokens(ctx, w)[1]) < 12)
    one = next(w for w in (" a", " x", "x") if len(short.split_tokens(ctx, w)[1]) == 1)
    reqs = [(ctx, one), (ctx, multi)]
    got = short.loglikelihood(reqs)
    assert short.n_truncated == 2 and got[0][1] == 1  # the next-token path
    for (c, t), (ll, n) in zip(reqs, got):
        cids, tids = short.split_tokens(c, t)
        ids = (cids + tids)[-12:]  # the model sees at most 12 tokens, the continuation always whole
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :, : lm.vocab_size].double(), -1)
        ref = sum(float(logp[len(ids) - len(tids) - 1 + j, tok]) for j, tok in enumerate(tids))
        assert n == len(tids) and ll == pytest.approx(ref, abs=1e-4)


def test_tokenizer_without_eod(lm):
    """A GPT-2 vocab without <|endoftext|> (tokenizer eod None): padding still works, generation never
    stops on EOD, and only an empty context (nothing to condition on) is refused."""
    from megacpt.errors import UserError
    from megacpt.eval.lm import EvalLM

    class NoEod:
        def __init__(self, tok):
            self.tok, self.vocab_size, self.eod = tok, tok.vocab_size, None

        def encode(self, text):
            return self.tok.encode(text)

        def decode(self, ids):
            return self.tok.decode(ids)

    other = EvalLM(lm.model, NoEod(lm.tok), max_length=lm.max_length, batch_size=3)
    prompts = ["Gold prices", "The agreement between Acme", "Shares"]
    # left padding with id 0 instead of EOD changes nothing; without EOD a row only runs longer
    for mine, ref in zip(other.greedy_generate(prompts, max_new_tokens=4), lm.greedy_generate(prompts, max_new_tokens=4)):
        assert mine.startswith(ref)
    got = other.loglikelihood([("Profits rose sharply", " positive"), ("Shares fell.", " negative result")])
    ref = lm.loglikelihood([("Profits rose sharply", " positive"), ("Shares fell.", " negative result")])
    for (a, n), (b, m) in zip(got, ref):
        assert n == m and a == pytest.approx(b, abs=1e-5)  # padding never attended: the id does not matter
    with pytest.raises(UserError, match="empty context"):
        other.loglikelihood([("", " positive")])
