"""The installed layout: one `galen` namespace, nothing top-level named like the folders."""

from __future__ import annotations

import subprocess
import sys


def test_galen_installs_as_one_namespace_and_no_top_level_model_flows_or_serve(tmp_path):
    code = (
        "import importlib.util as u, galen.model.config, galen.flows.cli, galen.serve.settings;"
        "print([n for n in ('model', 'flows', 'serve') if u.find_spec(n) is not None])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout  # run outside the checkout: only what pip installed is seen


def test_an_uploaded_job_imports_the_upload_not_the_installed_galen(tmp_path):
    """`galen submit` uploads the project and puts infra/job first on PYTHONPATH: galen.* must then
    come from the upload's own folders."""
    from pathlib import Path

    from galen.flows.submit import JOB_IMPORT_DIR

    root = Path(__file__).resolve().parents[2]
    upload = tmp_path / "upload"
    (upload / "model").mkdir(parents=True)
    (upload / "model" / "__init__.py").write_text("UPLOADED = True\n")
    (upload / JOB_IMPORT_DIR / "galen").mkdir(parents=True)
    (upload / JOB_IMPORT_DIR / "galen" / "__init__.py").write_text(
        (root / JOB_IMPORT_DIR / "galen" / "__init__.py").read_text())
    code = "import galen.model as m; print(getattr(m, 'UPLOADED', False), m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=upload, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": JOB_IMPORT_DIR})
    uploaded, where = out.stdout.split()
    assert uploaded == "True" and Path(where).resolve().is_relative_to(upload.resolve())
