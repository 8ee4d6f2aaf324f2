"""The documentation site builds without a warning, documents every public name, and the
README's links lead somewhere."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import memit
import memit.evaluation
import memit.tracing

REPO = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = [memit, memit.evaluation, memit.tracing]


def test_the_site_builds_in_strict_mode(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    result = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "editing" / "index.html").is_file()


def _public_objects():
    for module in PUBLIC_MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj


def test_every_public_function_class_and_method_has_a_docstring():
    missing = []
    for qualified, obj in _public_objects():
        if not (obj.__doc__ or "").strip():
            missing.append(qualified)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if not attr.startswith("_") and inspect.isfunction(function) and not inspect.getdoc(getattr(obj, attr)):
                    missing.append(f"{qualified}.{attr}")
    assert missing == []


def test_the_api_reference_names_every_public_name():
    reference = "\n".join(p.read_text() for p in (REPO / "docs" / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)$", reference, flags=re.M))
    public = {f"{m.__name__}.{name}" for m in PUBLIC_MODULES for name in m.__all__}
    assert public - documented == set()


def test_relative_links_of_the_readme_lead_to_files():
    text = (REPO / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)#:]+(?:#[^)]*)?)\)", text)]
    missing = [t for t in targets if t and not (REPO / t).exists()]
    assert targets and missing == []
