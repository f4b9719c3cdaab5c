"""The checkout never shadows an installed distribution, and the package works from the repository root.

``python -m pytest``, ``python -m megacpt`` and ``torchrun -m megacpt`` put the repository root first on
``sys.path``, so a top-level folder or module there wins over any installed package of the same name.
transformers 5.25 started importing Hugging Face's ``kernels`` distribution, and our old top-level
``kernels/`` folder broke every HF model construction. ``test_shadow_check_catches_a_clash`` shows the
check failing on exactly that layout.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OWN = {"megacpt"}  # names this repository's own distribution provides


def importable_names(root: Path) -> set[str]:
    """Top-level names ``import X`` can resolve to under ``root``: packages (regular or namespace: a
    namespace portion still shadows a namespace distribution) and modules."""
    names = set()
    for p in root.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir() and p.name.isidentifier():
            names.add(p.name)
        elif p.suffix in (".py", ".so", ".pyd") and p.stem.split(".")[0].isidentifier():
            names.add(p.stem.split(".")[0])
    return names


def shadowed(root: Path, distributions: dict[str, list[str]]) -> dict[str, list[str]]:
    """{name under root: the installed distributions whose top-level module it shadows}."""
    return {n: sorted(set(distributions[n])) for n in importable_names(root) - OWN
            if n in distributions and set(distributions[n]) - {"megacpt"}}


def test_nothing_at_the_root_shadows_an_installed_distribution():
    clash = shadowed(ROOT, importlib.metadata.packages_distributions())
    assert not clash, f"the repository root shadows installed distributions' modules: {clash}; rename or move them"


def test_shadow_check_catches_a_clash(tmp_path):
    """A folder named like an installed distribution's module (the old ``kernels/``) is caught."""
    (tmp_path / "megacpt").mkdir()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "yaml.py").write_text("")
    (tmp_path / "notes").mkdir()
    dists = {"kernels": ["kernels"], "yaml": ["PyYAML"], "megacpt": ["megacpt"], "numpy": ["numpy"]}
    assert shadowed(tmp_path, dists) == {"kernels": ["kernels"], "yaml": ["PyYAML"]}
    # and against the real environment: transformers' `kernels` dependency is installed here
    if "kernels" in importlib.metadata.packages_distributions():
        assert "kernels" in shadowed(tmp_path, importlib.metadata.packages_distributions())


def _from_root(code: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, *code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_hf_model_and_cli_work_from_the_repository_root():
    r = _from_root(["-c", "from transformers import GPTNeoXConfig, GPTNeoXForCausalLM\n"
                          "cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,"
                          " num_attention_heads=4, intermediate_size=64)\n"
                          "m = GPTNeoXForCausalLM(cfg)\n"
                          "import megacpt.kernels, kernels\n"
                          "print(sum(p.numel() for p in m.parameters()), kernels.__file__)"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert not r.stdout.split()[-1].startswith(str(ROOT)), f"`import kernels` resolved inside the checkout: {r.stdout}"
    r = _from_root(["-m", "megacpt", "--help"])
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr[-3000:]


def test_optional_dependency_errors_are_not_disguised(tmp_path, monkeypatch):
    """Absent -> "not installed"; installed but broken -> the real exception text, never "not installed"."""
    from megacpt.errors import UserError
    from megacpt.optional import optional, require

    assert optional("megacpt_no_such_module", "x") is None
    with pytest.raises(UserError, match="megacpt_no_such_module, which is not installed: pip install it"):
        require("megacpt_no_such_module.sub", "feature", "pip install it")
    pkg = tmp_path / "megacpt_broken_extra"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    (tmp_path / "megacpt_dep_missing.py").write_text("import megacpt_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"installed .* but fails to import: OSError: libcudart\.so\.12") as e:
        optional("megacpt_broken_extra", "model.attention_backend")
    assert "not installed" not in str(e.value)
    # an extra whose own dependency is missing is installed but broken: it names the missing dependency
    with pytest.raises(UserError, match="fails to import: ModuleNotFoundError: .*megacpt_absent_dependency"):
        require("megacpt_dep_missing", "feature", "pip install it")


def test_similarity_reports_a_broken_sentence_transformers(tmp_path, monkeypatch):
    """The scorer that used to turn any ImportError into "needs sentence-transformers" shows the real one."""
    from megacpt.errors import UserError
    from megacpt.selection.similarity import SentenceTransformerEmbedder

    fake = tmp_path / "sentence_transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text("from transformers import NoSuchThing\n")
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sentence_transformers", raising=False)
    with pytest.raises(UserError, match="fails to import: ImportError: cannot import name 'NoSuchThing'"):
        SentenceTransformerEmbedder(str(model))


def test_package_data_exists_and_core_imports_are_declared():
    """Every package_data pattern of setup.py matches a file, and the modules the core commands import are
    install_requires of the distribution (not only of an extra)."""
    import ast
    import glob

    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    for pkg, patterns in ast.literal_eval(kw["package_data"]).items():
        for pat in patterns:
            assert glob.glob(str(ROOT / pkg.replace(".", "/") / pat)), f"package_data {pkg}: {pat} matches nothing"
    requires = {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower()
                for r in importlib.metadata.requires("megacpt") or [] if "extra ==" not in r}
    for dist in ("scipy", "scikit-learn", "tiktoken", "threadpoolctl", "transformers", "megatron-core"):
        assert dist in requires, f"{dist} is imported by a core command but not in install_requires"
