import pytest

from megacpt.errors import UserError
from megacpt.eval.data import Example
from megacpt.eval.prompts import Template, build_prompt, example_rng, load_template, select_shots


def _ex(i, text, where="train.jsonl"):
    return Example(fields={"text": text}, label="positive", id=str(i), where=f"{where}:{i}")


def test_builtin_templates_load():
    for name in ("fpb", "fiqa_sa", "headline", "ner", "classification"):
        t = load_template(name)
        assert t.example.rstrip().endswith("{answer}")
    assert len(load_template("headline").extra["questions"]) == 9


def test_template_must_end_with_answer(tmp_path):
    with pytest.raises(UserError, match="must end with exactly one {answer}"):
        Template(example="{answer} then {text}")
    p = tmp_path / "t.yaml"
    p.write_text("example: 'Q: {text}\\nA: {answer}'\ninstruction: 'Classify.\\n'\n")
    t = load_template(str(p))
    with pytest.raises(UserError, match=r"no field\(s\) \['text'\]"):
        t.fill({"other": "x"}, None)


def test_prompt_layout_and_answer_whitespace():
    t = Template(example="S: {text}\nA: {answer}", instruction="Go.\n", separator="\n\n")
    ctx, lead = build_prompt(t, [({"text": "one"}, "positive"), ({"text": "two"}, "negative")], {"text": "three"})
    assert ctx == "Go.\nS: one\nA: positive\n\nS: two\nA: negative\n\nS: three\nA:"
    assert lead == " "  # the space before {answer} is scored with the label, like lm-eval's target_delimiter


def test_shots_seeded_distinct_and_never_the_query():
    pool = [_ex(i, f"sentence number {i}") for i in range(30)]
    query = _ex(7, "Sentence  number 7 ", where="test.jsonl")  # same text modulo case/space as pool[7]
    a = select_shots(pool, 5, query, example_rng(0, "fpb", 3))
    assert [e.id for e in a] == [e.id for e in select_shots(pool, 5, query, example_rng(0, "fpb", 3))]
    assert [e.id for e in a] != [e.id for e in select_shots(pool, 5, query, example_rng(1, "fpb", 3))]
    assert len({e.id for e in a}) == 5
    for i in range(30):  # leave-one-out over the pool itself: a query never appears in its own shots
        for seed in range(3):
            shots = select_shots(pool, 29 - 1, pool[i], example_rng(seed, "t", i))
            assert pool[i] not in shots
    for seed in range(20):
        assert "7" not in {e.id for e in select_shots(pool, 10, query, example_rng(seed, "fpb", 0))}
    with pytest.raises(UserError, match="only 29 usable train examples"):
        select_shots(pool, 30, pool[0], example_rng(0, "t", 0))
