"""Packaging: the core is framework-free, and installs put backends/ and ui/ only under orpo_local."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlx", "transformers", "peft", "bitsandbytes", "gradio", "datasets")


def test_core_imports_no_framework(tmp_path):
    code = (
        "import sys, json, pkgutil, importlib, orpo_local, orpo_local.data\n"
        "for m in pkgutil.walk_packages(orpo_local.__path__, 'orpo_local.'):\n"
        "    if not m.name.startswith(('orpo_local.backends', 'orpo_local.ui')): importlib.import_module(m.name)\n"
        "orpo_local.load_pairs('zh-sample')\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_installed_layout_maps_backends_and_ui_into_orpo_local(tmp_path):
    code = (
        "import importlib.util as u, json\n"
        "print(json.dumps([u.find_spec('orpo_local.backends').origin, u.find_spec('orpo_local.ui').origin, "
        "u.find_spec('backends') is None, u.find_spec('ui') is None]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    backends, ui, no_plain_backends, no_plain_ui = json.loads(out.stdout)
    assert Path(backends).parent.name == "backends" and Path(ui).parent.name == "ui"
    assert no_plain_backends and no_plain_ui


def test_wheel_holds_only_orpo_local_and_the_samples(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("orpo_local-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"orpo_local"}
    assert "orpo_local/backends/__init__.py" in names and "orpo_local/ui/__init__.py" in names
    assert "orpo_local/data/samples/zh_sample.jsonl" in names and "orpo_local/data/samples/en_sample.jsonl" in names
    assert not any(n.startswith(("backends/", "ui/", "tests/")) for n in names)
