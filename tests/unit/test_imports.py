"""House rules: light ``import raymeta``; the algorithm and data code import no Ray/DeepSpeed/MLflow."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import raymeta

ROOT = Path(__file__).resolve().parents[2]


def modules(package: str) -> list[str]:
    pkg = __import__(package, fromlist=["_"])
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]


def loaded_after(imports: list[str]) -> set[str]:
    code = (
        "import sys\n" + "".join(f"import {m}\n" for m in imports) + "print(' '.join(sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_import_raymeta_is_light():
    loaded = loaded_after(["raymeta", "raymeta.config"])
    assert not {"torch", "ray", "deepspeed", "mlflow", "transformers"} & loaded


def test_meta_and_data_import_no_heavy_wiring():
    mods = modules("raymeta.meta") + modules("raymeta.data")
    loaded = {m.split(".")[0] for m in loaded_after(mods)}
    assert not {"ray", "deepspeed", "mlflow"} & loaded
    assert "torch" in loaded  # the modules really were imported


def test_version():
    assert raymeta.__version__
