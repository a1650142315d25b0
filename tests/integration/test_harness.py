"""`gptflow harness` offline: lm-eval scores a model's export on a local task that the test
writes (lm-eval's own hellaswag task definition over a local data file), logs to MLflow, and
its acc and acc_norm equal the evaluate stage's figures on the same model."""

from __future__ import annotations

import json
import random
import sys
import uuid
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from typer.testing import CliRunner

from cli.app import app
from flows.harness import EXPERIMENT, import_lm_eval
from model.checkpoint import CONFIG, WEIGHTS
from model.errors import UserError
from support.corpus import toy_tokenizer
from support.models import save_base_checkpoint, tiny_gpt
from tasks import tracking
from tasks.evaluate_benchmarks import BenchmarkConfig, benchmark_figures
from tasks.models.sources import open_model

WORDS = "the a man woman dog ball runs jumps into water slowly then [title] garden tree cuts over".split()


def hellaswag_rows(count: int) -> list[dict]:
    """HellaSwag-shaped rows of random words (some with WikiHow's bracketed tags)."""
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return [
        {
            "activity_label": words(2),
            "ctx_a": words(rng.randint(3, 12)) + ".",
            "ctx_b": words(rng.randint(1, 4)),
            "endings": [words(rng.randint(1, 9)) + "." for _ in range(4)],
            "label": str(rng.randrange(4)),
        }
        for _ in range(count)
    ]


def write_local_task(directory: Path, data: Path) -> Path:
    """A task YAML that includes lm-eval's hellaswag task and reads `data` instead of the hub."""
    import lm_eval

    hellaswag = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    directory.mkdir()
    (directory / "local_hellaswag.yaml").write_text(
        f"include: {hellaswag}\n"
        "task: local_hellaswag\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs: {{data_files: {{validation: {data}}}}}\n"
        "training_split: null\n"
        "validation_split: validation\n"
    )
    return directory


def test_harness_on_a_local_task_equals_the_evaluate_stage_and_logs_to_mlflow(tmp_path, tiny_gpt2):
    pytest.importorskip("lm_eval")
    data = tmp_path / "hellaswag.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in hellaswag_rows(24)))
    tasks_dir = write_local_task(tmp_path / "tasks", data)

    result = CliRunner().invoke(
        app,
        [
            "harness",
            str(tiny_gpt2),
            "--tasks",
            "local_hellaswag",
            "--include-path",
            str(tasks_dir),
            "--batch-size",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "local_hellaswag" in result.output and "acc_norm" in result.output  # the printed table

    source = open_model(str(tiny_gpt2))
    benchmark = BenchmarkConfig(name="local_hellaswag", kind="hellaswag", source=str(data))
    ours = benchmark_figures(source.model, source.tokenizer, benchmark, batch_size=4)
    runs = tracking.client().search_runs(
        [tracking.experiment_id(EXPERIMENT)], order_by=["attributes.start_time DESC"], max_results=1
    )
    logged = runs[0].data.metrics
    assert logged["local_hellaswag_acc"] == pytest.approx(ours["local_hellaswag_acc"], abs=1e-9)
    assert logged["local_hellaswag_acc_norm"] == pytest.approx(ours["local_hellaswag_acc_norm"], abs=1e-9)
    assert "local_hellaswag_acc_stderr" in logged
    assert 0 < ours["local_hellaswag_acc"] < 1 or 0 < ours["local_hellaswag_acc_norm"] < 1  # not a degenerate case
    artifacts = [item.path for item in tracking.client().list_artifacts(runs[0].info.run_id, "harness")]
    assert artifacts == ["harness/results.json"]


def test_a_registered_model_is_scored_in_a_run_nested_under_its_own(tmp_path):
    pytest.importorskip("lm_eval")
    data = tmp_path / "hellaswag.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in hellaswag_rows(4)))
    tasks_dir = write_local_task(tmp_path / "tasks", data)
    tokenizer = toy_tokenizer(tmp_path / "tokenizer.json")
    checkpoint = save_base_checkpoint(tiny_gpt(Tokenizer.from_file(str(tokenizer)).get_vocab_size(), 64), tmp_path)
    name = f"harness-{uuid.uuid4().hex[:6]}"
    run_id = tracking.start_run(name, "pipeline")
    logged = tracking.log_text_generator(run_id, checkpoint / WEIGHTS, checkpoint / CONFIG, tokenizer)
    version = tracking.register_version(logged, name, tags={})
    tracking.end_run(run_id)

    uri = f"models:/{name}/{version}"
    result = CliRunner().invoke(app, ["harness", uri, "--tasks", "local_hellaswag", "--include-path", str(tasks_dir)])
    assert result.exit_code == 0, result.output
    nested = tracking.child_runs(run_id)
    assert list(nested) == ["harness"]
    assert "local_hellaswag_acc_norm" in tracking.get_run(nested["harness"]).data.metrics


def test_without_lm_eval_the_error_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'gptflow\[harness\]'") as error:
        import_lm_eval()
    assert "\n" not in str(error.value)
