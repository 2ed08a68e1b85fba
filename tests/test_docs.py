"""The documentation checked like code: README's quick start runs, README stays a front page
with its figures, and the API reference documents every argument of refine."""

import inspect
import os
import re

import pytest

import savae_fast as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_quick_start_runs(capsys):
    block = re.search(r"## Quick start with your own model\n\n```python\n(.*?)```", _readme(), re.S).group(1)
    exec(compile(block, "README.md (quick start)", "exec"), {})
    losses = [float(line.split()[1]) for line in capsys.readouterr().out.splitlines()]
    assert len(losses) == 3 and all(l > 0 for l in losses)


def test_readme_is_a_front_page_with_its_figures():
    text = _readme()
    assert text.count("\n") <= 300
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 2 and all(os.path.isfile(os.path.join(ROOT, p)) for p in images), images
    for link in re.findall(r"\]\((docs/[^)#]+)", text):  # every page it links to exists
        assert os.path.isfile(os.path.join(ROOT, link)), link


def test_every_argument_of_refine_is_documented():
    """The API reference renders refine's signature from the code and its docstring's Args: every
    parameter must be there, by name."""
    doc = inspect.getdoc(sf.refine)
    args = doc.split("Args:")[1].split("Returns:")[0]
    documented = set(re.findall(r"^    (\w+):", args, re.M))
    params = set(inspect.signature(sf.refine).parameters)
    assert params == documented, (params - documented, documented - params)
    assert "Raises:" in doc and "Returns:" in doc


@pytest.mark.parametrize("obj", [sf.refine, sf.RefineGraph, sf.GraphedStep, sf.reference.unrolled,
                                 sf.reference.optim_n2n, sf.nn.Dropout, sf.nn.repeat_rows, sf.ops.get_backend,
                                 sf.ops.forward_step, sf.ops.reverse_direction, sf.ops.reverse_update],
                         ids=lambda o: o.__qualname__)
def test_public_names_have_docstrings(obj):
    doc = inspect.getdoc(obj)
    assert doc and len(doc) > 80, obj


API_MODULES = ["savae_fast", "savae_fast.ops", "savae_fast.models", "savae_fast.testing", "savae_fast.reference",
               "savae_fast.nn"]


def _public_callables():
    import importlib

    seen = {}
    for name in API_MODULES:
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if callable(obj) and not inspect.ismodule(obj):
                seen.setdefault(id(obj), (f"{name}.{attr}", obj))
    return sorted(seen.values())


@pytest.mark.parametrize("name,obj", _public_callables(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_name_documents_its_arguments_returns_and_an_example(name, obj):
    """The API reference's contract: every public function and class of the documented modules
    says what it takes, what it gives and how it is called."""
    import enum

    doc = inspect.getdoc(obj) or ""
    assert "Example" in doc, f"{name}: no example"
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return
    target = obj.__init__ if isinstance(obj, type) else obj
    try:
        params = [p for p in inspect.signature(target).parameters if p not in ("self", "cls")]
    except (TypeError, ValueError):
        params = []
    if params and params != ["args", "kwargs"]:
        assert "Args:" in doc, f"{name}: arguments {params} undocumented"
    if not isinstance(obj, type):
        assert "Returns:" in doc, f"{name}: no Returns section"


@pytest.mark.parametrize("module", ["savae_fast.refine.api", "savae_fast.refine.graph", "savae_fast.step_graph",
                                    "savae_fast.ops", "savae_fast.ops.extension", "savae_fast.ops.constants",
                                    "savae_fast.models.text", "savae_fast.models.image", "savae_fast.testing",
                                    "savae_fast.reference.unrolled", "savae_fast.reference.optim_n2n",
                                    "savae_fast.gaussian", "savae_fast.nn"])
def test_docstring_examples_run(module):
    """The examples of the API reference run and print what they show (doctest)."""
    import doctest
    import importlib
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. GraphedStep running eagerly without a GPU
        res = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch},
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0 and res.attempted > 0, res


def _script(name: str):
    """A module of scripts/ (not a package), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_links = _script("check_links")


@pytest.mark.skipif(check_links.linkchecker_command() is None, reason='needs linkchecker (pip install -e ".[docs]")')
def test_link_check_finds_a_broken_link_and_image_and_passes_a_whole_site(tmp_path):
    """scripts/check_links.py, which CI runs on the built site: a missing page or image fails it, a
    complete site passes, also in a directory only its owner can read (linkchecker run as root
    reads files as nobody; the site is served over loopback HTTP)."""
    site = tmp_path / "private" / "site"
    site.mkdir(parents=True)
    os.chmod(tmp_path / "private", 0o700)
    (site / "page.html").write_text("<html><body><p>a page</p></body></html>")
    (site / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    good = '<html><body><a href="page.html">page</a><img src="figure.png"></body></html>'
    (site / "index.html").write_text(good)
    assert check_links.main([str(site)]) == 0
    (site / "index.html").write_text(good.replace("page.html", "missing.html"))
    assert check_links.main([str(site)]) != 0
    (site / "index.html").write_text(good.replace("figure.png", "missing.png"))
    assert check_links.main([str(site)]) != 0
