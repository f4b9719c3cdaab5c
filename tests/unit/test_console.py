"""What a user's console shows: no third-party import notices, a quiet end on a closed pipe, progress lines,
one --dtype vocabulary."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megacpt.cli import SIGPIPE_EXIT, build_command_parser, main
from megacpt.config import DTYPE_ALIASES, DTYPES, dtype_name
from megacpt.optional import import_quietly
from megacpt.progress import Progress, duration, human

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _numbers_jsonl(path: Path, n_docs: int, longest: int) -> Path:
    path.write_text("".join(json.dumps({"text": " ".join(str(j % 100) for j in range(i % longest + 1))}) + "\n"
                            for i in range(n_docs)))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """400 documents of token ids (NullTokenizer, so `inspect` decodes them: >64 KiB of text, a pipe's buffer)."""
    d = tmp_path_factory.mktemp("console")
    src = _numbers_jsonl(d / "in.jsonl", 400, 120)
    assert main(["preprocess", "--input", str(src), "--output-prefix", str(d / "ds"), "--tokenizer-type",
                 "NullTokenizer", "--vocab-size", "100", "--workers", "0", "--quiet"]) == 0
    return str(d / "ds_text_document")


# -- third-party import-time notices ------------------------------------------------------------------------
def test_megatron_core_import_notices_are_not_shown(dataset):
    """megatron-core warns "Transformer Engine and Apex are not installed" at import; building GPT datasets
    (what `megacpt train` does) imports it without those lines reaching the user."""
    code = ("from megacpt.data.gpt_dataset import build_gpt_datasets; import sys; "
            "t, _, _ = build_gpt_datasets(sys.argv[1], '100,0,0', 16, (4, 0, 0), cache_dir=sys.argv[2]); "
            "print(len(t))")
    r = subprocess.run([sys.executable, "-c", code, dataset, str(Path(dataset).parent / "cache")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 4   # megatron-core builds whole epochs
    assert "not installed" not in r.stderr and "Apex" not in r.stderr, r.stderr


def test_import_quietly_is_scoped_to_that_import(tmp_path, monkeypatch):
    pkg = tmp_path / "noisypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import logging, warnings\n"
        "warnings.warn('Apex is not installed. Falling back to Torch Norm', UserWarning)\n"
        "warnings.warn('noisypkg.old() is deprecated', UserWarning)\n"
        "logging.getLogger('noisypkg.sub').info('Megatron Core is not installed, running without it')\n"
        "def warn_later():\n"
        "    warnings.warn('Apex is not installed (asked at run time)', UserWarning)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before, level = list(warnings.filters), logging.getLogger("noisypkg").level
    logging.getLogger("noisypkg").setLevel(logging.INFO)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("noisypkg").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            filters_inside = list(warnings.filters)
            mod = import_quietly("noisypkg")
            assert [str(w.message) for w in seen] == ["noisypkg.old() is deprecated"]  # not an import notice
            assert list(warnings.filters) == filters_inside                           # restored
            mod.warn_later()
            assert str(seen[-1].message) == "Apex is not installed (asked at run time)"  # only the import
        assert records == [] and logging.getLogger("noisypkg").level == logging.INFO
    finally:
        logging.getLogger("noisypkg").removeHandler(handler)
        logging.getLogger("noisypkg").setLevel(level)
        sys.modules.pop("noisypkg", None)
    assert list(warnings.filters) == before


# -- a closed pipe ------------------------------------------------------------------------------------------
@pytest.mark.fault(fault="stdout pipe closed by its reader (`megacpt inspect --json | head`)",
                   stage="any command (inspect)", sees="nothing: no traceback; exit status 141, as for SIGPIPE",
                   left="nothing (inspect writes no files)")
@pytest.mark.parametrize("args", [["inspect", "{ds}", "--json"], ["inspect", "{ds}", "--num-docs", "0"],
                                  ["--help"], ["score", "--help"]])
def test_closed_pipe_ends_quietly(dataset, args):
    p = subprocess.Popen([sys.executable, "-m", "megacpt", *[a.format(ds=dataset) for a in args]], cwd=ROOT,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the command writes a byte
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert rc in ((SIGPIPE_EXIT,) if args[0] == "inspect" else (0, SIGPIPE_EXIT)), err  # argparse's help: 0


def test_closed_pipe_after_some_output_ends_quietly(dataset):
    """`| head -1` on the text summary, through a real shell pipeline."""
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m megacpt inspect {dataset} "
                        "--num-docs 400 | head -c 10"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == SIGPIPE_EXIT and len(r.stdout) == 10, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(dataset):
    code = ("import megacpt.cli as c\n"
            "def boom(argv):\n"
            "    raise BrokenPipeError(32, 'a worker pipe')\n"
            "c._dispatch = boom\n"
            "raise SystemExit(c.main(['inspect']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "BrokenPipeError: [Errno 32] a worker pipe" in r.stderr


# -- progress -----------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_lines_off_a_terminal_have_rate_and_eta():
    clock, out = _Clock(), io.StringIO()
    p = Progress("score x", total=1000, unit="tok", every_s=5, stream=out, clock=clock)
    clock.t += 2
    p.update(100, docs=10)                  # the first update is shown at once
    clock.t += 2
    p.update(100, docs=10)                  # 2 s later: not yet
    clock.t += 4
    p.update(200, docs=20)                  # 6 s after the first line
    clock.t += 2
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == ["score x: 100/1,000 tok (10.0%), 50 tok/s, 5 docs/s, ETA 18s",
                     "score x: 400/1,000 tok (40.0%), 50 tok/s, 5 docs/s, ETA 12s",
                     "score x: 400/1,000 tok (40.0%), 40 tok/s, 4 docs/s, took 10s"]   # the end: no ETA
    assert "\r" not in out.getvalue()


def test_progress_resumed_work_is_not_speed_and_bytes_are_scaled():
    clock, out = _Clock(), io.StringIO()
    p = Progress("preprocess", total=4_000_000, unit="B", stream=out, clock=clock)
    p.done = p.start_done = 2_000_000       # done by an earlier run
    clock.t += 10
    p.update(1_000_000, docs=500)
    assert out.getvalue() == "preprocess: 3.0MB/4.0MB (75.0%), 100.0kB/s, 50 docs/s, ETA 10s\n"


def test_progress_bar_on_a_terminal_and_silence_when_disabled():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = Progress("preprocess", total=10, stream=tty, every_s=0)
    p.update(5)
    p.close()
    assert "\r" in tty.getvalue() and "5/10" in tty.getvalue()    # tqdm's bar
    quiet = io.StringIO()
    p = Progress("preprocess", total=10, stream=quiet, enabled=False)
    p.update(5)
    p.close()
    assert quiet.getvalue() == ""


def test_human_and_duration():
    assert [human(x) for x in (7, 12.34, 999, 1234, 2.5e6)] == ["7", "12", "999", "1.2k", "2.5M"]
    assert [duration(s) for s in (7, 125, 3 * 3600 + 7 * 60)] == ["7s", "2m05s", "3h07m"]


def test_preprocess_prints_progress_lines_with_eta(tmp_path, capsys):
    src = _numbers_jsonl(tmp_path / "in.jsonl", 400, 40)
    assert main(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "out"),
                 "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--workers", "0",
                 "--chunk-bytes", "4096", "--log-interval", "0"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("preprocess: ")]
    assert len(lines) > 3, lines
    total = human(src.stat().st_size, "B")
    assert f"/{total} (" in lines[0] and "B/s" in lines[0] and "docs/s" in lines[0] and "ETA" in lines[0], lines
    assert lines[-1].startswith(f"preprocess: {total}/{total} (100.0%)") and "ETA" not in lines[-1]


# -- one dtype vocabulary -----------------------------------------------------------------------------------
_DTYPE_COMMANDS = {  # command line up to --dtype -> the dtypes it takes
    "score perplexity": (["score", "perplexity", "--model", "m", "--data", "d", "--out", "o", "--seq-length", "8"],
                         ("fp32", "bf16", "fp16", "auto")),
    "score similarity": (["score", "similarity", "--data", "d", "--out", "o", "--task-data", "t"],
                         ("fp32", "bf16", "auto")),
    "eval finance": (["eval", "finance", "--model", "m", "--data-dir", "d", "--out", "o"], ("fp32", "bf16", "fp16")),
    "eval perplexity": (["eval", "perplexity", "--model", "m", "--data", "d", "--out", "o"], ("fp32", "bf16", "fp16")),
    "eval probe": (["eval", "probe", "--model", "m", "--tasks", "t", "--data-dir", "d", "--out", "o"],
                   ("fp32", "bf16", "fp16")),
    "eval lm-eval": (["eval", "lm-eval", "--model", "m", "--out", "o"], ("fp32", "bf16", "fp16")),
    "convert megacpt-to-hf": (["convert", "megacpt-to-hf", "--ckpt", "c", "--out", "o"],
                              ("fp32", "bf16", "fp16", "auto")),
}


def _parse(argv):
    return build_command_parser(argv[0]).parse_args(argv[1:])


@pytest.mark.parametrize("command", list(_DTYPE_COMMANDS))
def test_every_dtype_flag_takes_the_canonical_names_and_the_old_spellings(command, capsys):
    argv, allowed = _DTYPE_COMMANDS[command]
    for name in allowed:
        assert _parse([*argv, "--dtype", name]).dtype == name
    for alias, canonical in DTYPE_ALIASES.items():
        if canonical in allowed:
            assert _parse([*argv, "--dtype", alias]).dtype == canonical
            assert _parse([*argv, "--dtype", alias.upper()]).dtype == canonical
    with pytest.raises(SystemExit):
        _parse([*argv, "--dtype", "int8"])
    err = capsys.readouterr().err
    assert "invalid choice: 'int8' (choose from " + ", ".join(f"'{n}'" for n in allowed) + ")" in err
    assert "--dtype {" + ",".join(allowed) + "}" in _subcommand_help(argv[0], argv[1])


def _subcommand_help(command: str, name: str) -> str:
    import argparse

    parser = build_command_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choice = sub.choices[name]
    if command == "score":  # a scorer's options are built when it is chosen: build them now
        from megacpt.selection.cli import SCORERS

        SCORERS[name].add_arguments(choice)
    return choice.format_help()


def test_dtype_names():
    assert set(DTYPES) == {"fp32", "bf16", "fp16"}
    assert dtype_name("float32") == "fp32" and dtype_name("half") == "fp16" and dtype_name(" BFloat16 ") == "bf16"
    assert dtype_name("auto") == "auto" and dtype_name("int8") == "int8"  # left for the choices check to refuse


def test_training_config_dtypes_take_the_same_vocabulary():
    """`megacpt train`'s dtypes are config keys: train.precision (fp32|bf16|auto) and FSDP's
    parallel.mixed_precision_* (torch's names) accept each other's spellings."""
    from megacpt.config import ParallelConfig, TrainConfig, fields_from_dict

    assert fields_from_dict(TrainConfig, "train", {"precision": "bfloat16"}).precision == "bf16"
    assert fields_from_dict(TrainConfig, "train", {"precision": "float32"}).precision == "fp32"
    par = fields_from_dict(ParallelConfig, "parallel", {"mixed_precision_param": "bf16",
                                                         "mixed_precision_reduce": "fp32"})
    assert (par.mixed_precision_param, par.mixed_precision_reduce) == ("bfloat16", "float32")
