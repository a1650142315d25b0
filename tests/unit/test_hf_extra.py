"""`gptflow export` as a user meets it after a plain `pip install .`: without the `hf` extra
(transformers hidden by tests/support/hidden_packages) it stops with one line naming the extra."""

from __future__ import annotations

import os
import subprocess

from support import REPO
from support.models import save_base_checkpoint, tiny_gpt
from support.processes import GPTFLOW

HIDDEN_PACKAGES = REPO / "tests" / "support" / "hidden_packages"  # its sitecustomize.py hides them


def test_export_without_the_hf_extra_names_the_extra_in_one_line(tmp_path):
    checkpoint = save_base_checkpoint(tiny_gpt(vocab_size=64), tmp_path)
    env = {**os.environ, "PYTHONPATH": str(HIDDEN_PACKAGES), "HIDDEN_PACKAGES": "transformers"}
    command = [GPTFLOW, "export", str(checkpoint), str(tmp_path / "exported")]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "error: gptflow export needs transformers, which the hf extra installs: pip install 'gptflow[hf]' "
        "(from a clone: pip install '.[hf]')"
    ]
    assert not (tmp_path / "exported").exists()
