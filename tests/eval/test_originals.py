"""`megacpt eval convert-data`: every common variant of the four benchmarks' original files.

The fixtures under fixtures/originals/ are written by hand in the original formats (invented text, no
third-party data): FPB's ``Sentences_*Agree.txt`` (Latin-1 with CRLF, Windows-1252, UTF-8) and Kaggle's
``all-data.csv``; FiQA task 1 JSON (headline: pretty-printed, string scores; post: one line, numeric scores),
the HF hub CSV and a flattened TSV; gold-news headline CSVs under the Kaggle release's, BloombergGPT's and
snake_case column names; CoNLL NER as released (4 columns, -DOCSTART-, IOB1), IOB2 (tab, 2 columns), IO
and IOBES. Every test asserts the exact items and labels.
"""
import json

import pytest

from megacpt.cli import main
from megacpt.errors import InputError
from megacpt.eval.data import HEADLINE_QUESTIONS, load_examples
from megacpt.eval.originals import convert, parse_conll, parse_fiqa, parse_fpb, parse_headline, read_text

from .conftest import FIXTURES

ORIG = FIXTURES / "originals"


def refused(parse, path, text: str, match: str) -> None:
    """``parse`` refuses ``text`` written to ``path`` with a message matching ``match``."""
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        parse(path)


# --- FPB ----------------------------------------------------------------------------------------------

def test_fpb_release_latin1_crlf_at_inside_sentence():
    p = parse_fpb(ORIG / "Sentences_50Agree.txt")
    assert (p.format, p.encoding) == ("fpb-sentences", "latin-1")
    assert [(r["text"], r["label"]) for r in p.rows] == [
        ("Operating profit rose to EUR 4.2 mn from EUR 3.1 mn a year earlier .", "positive"),
        ("Net sales fell by 6 % year on year .", "negative"),
        ("The café chain will open two stores in Tampere .", "neutral"),
        ("Questions may be sent to ir@example.fi before the meeting .", "neutral"),
        ("The company expects its result to improve .", "positive"),
        ("The company expects its result to improve .", "positive"),  # duplicates in one file are kept
    ]
    assert [r["id"] for r in p.rows][:3] == ["Sentences_50Agree:1", "Sentences_50Agree:2", "Sentences_50Agree:4"]


def test_fpb_utf8_and_cp1252_levels():
    p = parse_fpb(ORIG / "Sentences_AllAgree.txt")
    assert p.encoding == "utf-8" and p.rows[1] == {"id": "Sentences_AllAgree:2", "label": "positive",
                                                   "text": "Orders worth EUR 12 mn were booked in Mäntsälä ."}
    p = parse_fpb(ORIG / "Sentences_66Agree.txt")
    assert p.encoding == "cp1252"
    assert p.rows[0]["text"] == "The board’s proposal – a dividend of EUR 0.30 – was approved ."


def test_fpb_kaggle_all_data_csv():
    p = parse_fpb(ORIG / "all-data.csv")
    assert (p.format, p.encoding) == ("fpb-csv", "latin-1")
    assert [(r["label"], r["text"]) for r in p.rows] == [
        ("neutral", "The café chain will open two stores in Tampere ."),
        ("negative", "Net sales fell by 6 % year on year , the company said ."),
        ("positive", "Operating profit rose to EUR 4.2 mn ."),
    ]


@pytest.mark.parametrize("name,text,match", [
    ("Sentences_75Agree.txt", "fine .@positive\nno label at all\n",
     r"Sentences_75Agree.txt:2: expected 'sentence@label' with label one of"),
    ("Sentences_75Agree.txt", "fine .@positive\nbad .@bullish\n", r"Sentences_75Agree.txt:2: label 'bullish'"),
    ("Sentences_75Agree.txt", "mail me at a@b.com\n", r":1: label 'b.com' after the last '@' is not one of"),
    ("Sentences_75Agree.txt", "\n\n", "no 'sentence@label' lines"),
    ("all-data.csv", "neutral,ok .\nbullish,not a label .\n", r"all-data.csv:2: neither field is a label"),
])
def test_fpb_refusals_name_file_line_and_expectation(tmp_path, name, text, match):
    refused(parse_fpb, tmp_path / name, text, match)


def test_fpb_levels_combined_drop_nested_duplicates(tmp_path):
    rep = convert("fpb", [str(ORIG / "Sentences_50Agree.txt"), str(ORIG / "Sentences_AllAgree.txt")], tmp_path,
                  test_fraction=0.25, seed=0)
    assert [f["duplicates_of_earlier_files"] for f in rep["inputs"]] == [0, 1]
    assert rep["train"] + rep["test"] == 7  # 6 + 2 - the AllAgree line already in 50Agree
    src = json.loads((tmp_path / "fpb/source.json").read_text())
    assert src["inputs"][0]["encoding"] == "latin-1" and len(src["inputs"][0]["sha256"]) == 64
    train = load_examples(tmp_path / "fpb/train.jsonl", "classification", ("negative", "neutral", "positive"))
    test = load_examples(tmp_path / "fpb/test.jsonl", "classification", ("negative", "neutral", "positive"))
    assert not {e.text for e in train} & {e.text for e in test}  # the duplicate pair stays on one side


# --- FiQA SA ------------------------------------------------------------------------------------------

def test_fiqa_headline_json_one_example_per_target():
    p = parse_fiqa(ORIG / "task1_headline_ABSA_train.json")
    assert p.format == "fiqa-json"
    assert [(r["id"], r["target"], r["score"], r["label"]) for r in p.rows] == [
        ("101:0", "Acme Corp", 0.52, "positive"), ("102:0", "Globex", -0.41, "negative"),
        ("102:1", "Initech", 0.05, "neutral"), ("103:0", "Umbrella", -0.1, "neutral")]
    assert p.rows[1]["text"] == p.rows[2]["text"] == "Globex cuts 500 jobs while Initech holds steady"


def test_fiqa_post_json_numeric_scores():
    p = parse_fiqa(ORIG / "task1_post_ABSA_train.json")
    assert [(r["text"], r["target"], r["label"]) for r in p.rows] == [
        ("$HOOLI breaking out of its range, next stop 120", "HOOLI", "positive"),
        ("Selling my $VANDL here, earnings look weak", "VANDL", "neutral")]  # -0.099 >= -0.1


def test_fiqa_hub_csv_and_flat_tsv():
    p = parse_fiqa(ORIG / "fiqa_sentiment_train.csv")
    assert p.format == "fiqa-csv"
    assert [(r["id"], r["text"], r["target"], r["label"]) for r in p.rows] == [
        ("1001", "Acme Corp shares jump after upbeat guidance", "Acme Corp", "positive"),
        ("1002", "$HOOLI breaking out of its range, next stop 120", "HOOLI", "positive"),
        ("1003", "Globex cuts 500 jobs while Initech holds steady", "Globex", "negative")]
    p = parse_fiqa(ORIG / "fiqa_flat.tsv")
    assert p.format == "fiqa-tsv"
    assert [(r["target"], r["score"], r["label"]) for r in p.rows] == [("Umbrella", -0.1, "neutral"),
                                                                        ("VANDL", -0.1001, "negative")]


def test_fiqa_refusals(tmp_path):
    bad = tmp_path / "task1_headline_ABSA_test.json"
    for text, match in [
        ('{\n  "1": {"sentence": "A up", "info": [{"target": "A", "sentiment_score": "0.2"}]},\n'
         '  "2": {"sentence": "B down", "info": [{"target": "B"}]}\n}\n',
         r"test.json:3: entry '2' info\[0\]: need 'target' and a numeric 'sentiment_score'"),
        ('{"1": {"sentence": "A", "info": [{"target": "A", "sentiment_score": "1.7"}]}}',
         r"sentiment score 1.7 is not in \[-1, 1\]"),
        ('{"1": {"sentence": "A", "info": [}', r"test.json:1: malformed JSON"),
    ]:
        refused(parse_fiqa, bad, text, match)
    refused(parse_fiqa, tmp_path / "fiqa.csv", "sentence,aspect,type\nA up,Stock,headline\n",
            r"fiqa.csv:1: FiQA table: found columns \['sentence', 'aspect', 'type'\], missing \['target', 'score")
    refused(parse_fiqa, tmp_path / "fiqa.csv", "sentence,target,score\nA up,A,0.3\nB down,B\n",
            r"fiqa.csv:3: 2 fields, the header has 3")


# --- Headline -----------------------------------------------------------------------------------------

def _labels(yes: str) -> dict:
    return {q: ("yes" if q in yes.split() else "no") for q in HEADLINE_QUESTIONS}


def test_headline_kaggle_release_names_and_skipped_empty_cell():
    p = parse_headline(ORIG / "finalDataset_0208.csv")
    assert [(r["id"], r["text"], r["labels"]) for r in p.rows] == [
        ("finalDataset_0208:2", "gold climbs 1% as dollar slips, set for weekly gain", _labels("price_or_not price_up past_price")),
        ("finalDataset_0208:3", "gold steady ahead of fed meeting", _labels("price_or_not price_constant past_price future_news")),
        ("finalDataset_0208:4", "gold may fall next week: analysts", _labels("price_or_not price_down future_price")),
        ("finalDataset_0208:5", "gold outshines equities in february", _labels("price_or_not price_up past_price asset_comparison")),
        ("finalDataset_0208:7", "central banks bought more gold last year", _labels("past_news")),
    ]
    assert len(p.skipped) == 1 and p.skipped[0].endswith("finalDataset_0208.csv:6: no value in ['Price or Not']")


def test_headline_bloomberggpt_names_and_snake_case_tsv():
    p = parse_headline(ORIG / "gold_news_bloomberg_names.csv")
    assert [(r["text"], r["labels"]) for r in p.rows] == [
        ("gold edges up as yields dip", _labels("price_or_not price_up past_price")),
        ("gold seen range-bound next quarter", _labels("price_or_not price_constant future_price"))]
    p = parse_headline(ORIG / "gold_news_snake.tsv")
    assert [(r["text"], r["labels"]) for r in p.rows] == [
        ("gold slides 2%, silver tumbles", _labels("price_or_not price_down past_price asset_comparison")),
        ("india to cut gold import duty", _labels("future_news"))]


def test_headline_error_lists_found_and_missing_columns(tmp_path):
    with pytest.raises(InputError) as e:
        parse_headline(ORIG / "gold-dataset-sentiment.csv")
    msg = str(e.value)
    assert "gold-dataset-sentiment.csv:1: headline CSV: question columns found: price_up='Price Direction Up'" in msg
    assert "asset_comparison='Asset Comparision'" in msg
    for q in ("price_or_not", "past_price", "future_price", "past_news", "future_news"):
        assert f"{q}: one of" in msg
    assert "'Past General'" in msg and "'PastNews'" in msg  # the accepted names are listed
    p = tmp_path / "h.csv"
    p.write_text("Headline,PastNews,Past General," + ",".join(q for q in HEADLINE_QUESTIONS if q != "past_news") + "\n")
    with pytest.raises(InputError, match=r"question 'past_news': several columns match \(\['PastNews', 'Past General'\]\)"):
        parse_headline(p)
    good = (ORIG / "gold_news_bloomberg_names.csv").read_text().splitlines()
    p.write_text("\n".join(good[:2] + ["gold up,1,2,0,0,1,0,0,0,0"]) + "\n")
    with pytest.raises(InputError, match=r"h.csv:3: column 'price up': expected 0 or 1, got '2'"):
        parse_headline(p)


# --- NER ----------------------------------------------------------------------------------------------

def _ents(row):
    return [(e["text"], e["type"]) for e in row["entities"]]


def test_ner_release_format_iob1_4col_docstart():
    p = parse_conll(ORIG / "FIN3_excerpt.txt")
    assert p.format == "conll-iob1-4col"
    assert [r["text"] for r in p.rows] == [
        "This LOAN AGREEMENT is made between Acme Holdings Inc and Globex B.V. , represented by Mr . John Smith .",
        "Lenders : Alpha Bank Beta Capital Ltd", "Page 1 of 12", "Governed by English law in London .",
        "The Borrower , Initech LLC of Delaware ."]
    assert [_ents(r) for r in p.rows] == [
        [("Acme Holdings Inc", "ORG"), ("Globex B.V.", "ORG"), ("John Smith", "PER")],
        [("Alpha Bank", "ORG"), ("Beta Capital Ltd", "ORG")],  # IOB1's B- splits adjacent same-type entities
        [],
        [("English", "MISC"), ("London", "LOC")],
        [("Borrower", "PER"), ("Initech LLC", "ORG"), ("Delaware", "LOC")]]
    assert p.rows[0]["id"] == "FIN3_excerpt:3" and not p.notes


def test_ner_iob2_tab_2col_and_iobes():
    p = parse_conll(ORIG / "iob2_2col.tsv")
    assert p.format == "conll-iob2-2col"
    assert [_ents(r) for r in p.rows] == [[("Jane Doe", "PER"), ("Hooli", "ORG"), ("Vandelay Industries", "ORG")], []]
    p = parse_conll(ORIG / "iobes_2col.conll")
    assert [_ents(r) for r in p.rows] == [[("Paris", "LOC"), ("New York", "LOC"), ("Acme Corp", "ORG"), ("Globex", "ORG")]]


def test_ner_io_tags_merge_adjacent_and_say_so():
    p = parse_conll(ORIG / "io_2col.conll")
    assert p.format == "conll-io-2col"
    assert [_ents(r) for r in p.rows] == [[("Alpha Bank Beta Capital", "ORG"), ("Zurich", "LOC")], [("Jane", "PER")]]
    assert len(p.notes) == 1 and "1 multi-token spans were read as one entity each" in p.notes[0]
    assert "io_2col.conll:3" in p.notes[0]


@pytest.mark.parametrize("text,match", [
    ("A NNP - B-ORG\nB NNP - B-MONEY\n", r"x.conll:2: tag 'B-MONEY': expected O, or \[B-\|I-"),
    ("A NNP - I-ORG\nB NNP O\n", r"x.conll:2: 3 columns, line 1 has 4"),
    ("A I-ORG\nB ORG\n", r"x.conll:2: tag 'ORG' mixes tag schemes: line 1 has B-/I- prefixed tags"),
    ("lonely\n", r"x.conll:1: expected 'token ... TAG'"),
])
def test_ner_refusals(tmp_path, text, match):
    refused(parse_conll, tmp_path / "x.conll", text, match)


def test_ner_convert_keeps_every_type_and_sentence(tmp_path):
    rep = convert("ner", [str(ORIG / "iob2_2col.tsv")], tmp_path, test_inputs=[str(ORIG / "FIN3_excerpt.txt")])
    assert (rep["train"], rep["test"]) == (2, 5)  # MISC and entity-less sentences: the protocol decides at eval time
    test = load_examples(tmp_path / "ner/test.jsonl", "ner", ("PER", "ORG", "LOC", "MISC"))
    assert test[3].label == [("English", "MISC"), ("London", "LOC")] and test[2].label == []


# --- encodings and the CLI ----------------------------------------------------------------------------

def test_read_text_encodings(tmp_path):
    p = tmp_path / "f.txt"
    p.write_bytes("\ufeffcafé".encode("utf-8"))
    assert read_text(p) == ("café", "utf-8")
    p.write_bytes("café".encode("latin-1"))
    assert read_text(p) == ("café", "latin-1")
    p.write_bytes("“café”".encode("cp1252"))
    assert read_text(p) == ("“café”", "cp1252")


def test_convert_data_cli_reports_format_skips_and_notes(tmp_path, capsys):
    assert main(["eval", "convert-data", "--task", "headline", "--input", str(ORIG / "finalDataset_0208.csv"),
                 "--out-dir", str(tmp_path), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "headline-csv, utf-8, 5 examples" in out and "skipped" in out and "finalDataset_0208.csv:6" in out
    assert "wrote 4 train / 1 test examples" in out and "(1 rows skipped)" in out
    assert main(["eval", "convert-data", "--task", "ner", "--input", str(ORIG / "io_2col.conll"),
                 "--test-input", str(ORIG / "iob2_2col.tsv"), "--out-dir", str(tmp_path)]) == 0
    assert "note: " in capsys.readouterr().out
    assert main(["eval", "convert-data", "--task", "headline", "--input", str(ORIG / "gold-dataset-sentiment.csv"),
                 "--out-dir", str(tmp_path / "x")]) == 2
    assert "missing: price_or_not" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_headline_columns_cover_every_question():
    from megacpt.eval.originals import HEADLINE_COLUMNS

    assert tuple(HEADLINE_COLUMNS) == HEADLINE_QUESTIONS
