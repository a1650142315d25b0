"""The command line imports only what a command needs (issue 27): `--help` neither torch,
Prefect nor MLflow; `generate` on a checkpoint directory neither Prefect nor MLflow. Each
command runs in a fresh interpreter, which then lists the heavy packages it had imported.
How fast it starts is bench/startup.py's to measure; this holds the discipline that makes it fast."""

import json

from support.configs import MICRO_GPT
from support.models import checkpoint_to_generate_from
from support.processes import run_python

HEAVY = ("torch", "prefect", "mlflow", "transformers")

# Runs `gptflow ARGS...` as its console script does, then prints the heavy packages imported.
IMPORTED_BY_COMMAND = f"""
import json, sys
from cli.app import main
sys.argv = ["gptflow", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))))
"""


def imported_by(*args: str) -> list[str]:
    return json.loads(run_python(IMPORTED_BY_COMMAND, *args).splitlines()[-1])


def test_help_imports_no_torch_prefect_or_mlflow():
    assert imported_by("--help") == []
    assert imported_by("generate", "--help") == []


def test_generate_from_a_checkpoint_imports_torch_but_not_prefect_or_mlflow(tmp_path):
    texts = ["def add(a, b):\n    return a + b\n"] * 20
    checkpoint = checkpoint_to_generate_from(tmp_path, MICRO_GPT, texts, vocab_size=300)
    args = ("generate", str(checkpoint), "-p", "def", "--max-new-tokens", "2", "--seed", "0", "--stream")
    assert imported_by(*args) == ["torch"]
