"""docs/reliability.md is generated from the fault markers of the tests (tools/reliability_doc.py) and current."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "reliability_doc.py"


def _tool():
    spec = importlib.util.spec_from_file_location("reliability_doc", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


def test_reliability_doc_is_current():
    """Regenerate with `python tools/reliability_doc.py` after adding or changing a fault marker."""
    r = subprocess.run([sys.executable, str(TOOL), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "| fault | stage | what the user sees | what is left on disk | test |" in \
        (ROOT / "docs" / "reliability.md").read_text()


_MARKED = '''
import pytest
from pytest import mark


@pytest.mark.slow
@pytest.mark.fault(fault="kill -9 mid-write", stage="preprocess", sees="the re-run removes the temporary",
                   left="nothing | not even a .tmp")
def test_kill(tmp_path):
    pass


def test_unmarked():
    pass


class TestTruncation:
    @mark.fault(fault="truncated .idx", stage="inspect", sees="one line naming the file", left="the file as it was")
    def test_idx(self):
        pass
'''


def test_generator_reads_markers_without_importing(tmp_path):
    tool = _tool()
    tests = tmp_path / "tests"
    (tests / "sub").mkdir(parents=True)
    # the marked file imports a module that does not exist: the generator must not import it
    (tests / "sub" / "test_faults.py").write_text("import no_such_module_anywhere\n" + _MARKED)
    rows = tool.collect(tests)
    assert [(r.stage, r.fault, r.test_id) for r in rows] == [
        ("inspect", "truncated .idx", "tests/sub/test_faults.py::TestTruncation::test_idx"),
        ("preprocess", "kill -9 mid-write", "tests/sub/test_faults.py::test_kill")]
    text = tool.render(rows)
    assert "| kill -9 mid-write | preprocess | the re-run removes the temporary | nothing \\| not even a .tmp | " \
           "`tests/sub/test_faults.py::test_kill` |" in text
    assert "test_unmarked" not in text

    out = tmp_path / "reliability.md"
    assert tool.main(["--tests", str(tests), "--out", str(out), "--check"]) == 1      # missing
    assert tool.main(["--tests", str(tests), "--out", str(out)]) == 0
    assert out.read_text() == text
    assert tool.main(["--tests", str(tests), "--out", str(out), "--check"]) == 0
    (tests / "sub" / "test_faults.py").write_text(_MARKED.replace("the file as it was", "nothing"))
    assert tool.main(["--tests", str(tests), "--out", str(out), "--check"]) == 1      # stale


@pytest.mark.parametrize("marker, error", [
    ('fault="x", stage="y", sees="z"', "missing left"),
    ('fault="x", stage="y", sees="z", left=LEFT', "left= must be a non-empty literal string"),
    ('fault="x", stage="y", sees="z", left="w", where="v"', "unknown argument 'where'"),
    ('"x", stage="y", sees="z", left="w"', "give fault=, stage=, sees=, left= as keywords"),
])
def test_unreadable_marker_is_an_error_naming_the_line(tmp_path, capsys, marker, error):
    tool = _tool()
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_x.py").write_text(textwrap.dedent(f"""
        import pytest

        @pytest.mark.fault({marker})
        def test_x():
            pass
    """))
    assert tool.main(["--tests", str(tests), "--out", str(tmp_path / "r.md")]) == 2
    assert f"tests/test_x.py:4: fault marker: {error}" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_a_marker_not_on_a_test_function_is_an_error(tmp_path, capsys):
    """pytestmark / pytest.param(marks=...) would be rows silently lost: refused, naming the line."""
    tool = _tool()
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_x.py").write_text('import pytest\n\npytestmark = pytest.mark.fault(fault="a", stage="b", '
                                     'sees="c", left="d")\n')
    assert tool.main(["--tests", str(tests), "--out", str(tmp_path / "r.md")]) == 2
    assert "tests/test_x.py:3: fault marker: put it on the test function itself" in capsys.readouterr().err
