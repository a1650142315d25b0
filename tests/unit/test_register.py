"""The registry stage: lineage tags, aliases and the champion gate, on a real MLflow store."""

import json
import uuid

import pytest
import torch

from model.checkpoint import load_model
from model.errors import UserError
from model.generate import generate
from model.scoring import val_windows
from model.special_tokens import special_ids
from support.corpus import TEXTS, toy_tokenizer, write_corpus, write_val_shards
from support.devices import record_module_moves, stand_in_gpus
from support.models import save_base_checkpoint, tiny_gpt
from support.progress import phase_lines
from tasks import tracking
from tasks.bpe import load_tokenizer
from tasks.core.workspace import sha256_file
from tasks.evaluate import EvaluateConfig, document_figures, evaluate_model
from tasks.evaluate_benchmarks import BenchmarkConfig, benchmark_figures
from tasks.register import (
    CANDIDATE,
    CHAMPION,
    CHAMPION_STAGE,
    WEIGHTS_TAG,
    EvalData,
    RegisterConfig,
    champion_figure,
    run_register,
)
from tasks.tracking.registry import load_registered_model

SEQ_LEN = 16
# Evaluation data unlike TEXTS, which the toy tokenizer was trained on.
OTHER_TEXTS = [
    "while queue:\n    item = queue.pop()\n",
    "import os\nprint(os.getcwd())\n",
    "table = {'k': [1, 2, 3]}\n",
]


def eval_data_of(root, tokenizer_path, tokenizer, texts, label):
    """(root, tokenizer_path, tokenizer, corpus, shards): `texts` as val documents and val
    shards, the data the gate scores on."""
    corpus = write_corpus(root / f"{label}.parquet", [(str(i), text, "val") for i, text in enumerate(texts)])
    shards = write_val_shards(root / f"{label}-shards", tokenizer, tokenizer_path, texts, SEQ_LEN)
    return root, tokenizer_path, tokenizer, corpus, shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("register")
    tokenizer_path = toy_tokenizer(root / "tokenizer.json")
    return eval_data_of(root, tokenizer_path, load_tokenizer(tokenizer_path), TEXTS * 2, "eval")


def checkpoint_of(model, root, label):
    return save_base_checkpoint(model, root / label)


def fitted(model, shards, steps=30):
    """The model after a few steps on the val windows: clearly better on them."""
    windows = val_windows(shards, limit=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(windows[:, :-1], windows[:, 1:].contiguous()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def register(name, checkpoint, data, eval_config, metrics=None, config=None):
    config = config or RegisterConfig()
    root, tokenizer_path, tokenizer, corpus, shards = data
    eval_data = EvalData(eval_config, shards, corpus)
    figures = metrics or evaluate_model(load_model(checkpoint), tokenizer, eval_config, shards, corpus)
    run_id = tracking.start_run(name, "register")
    output = run_register(
        config,
        name,
        checkpoint,
        tokenizer_path,
        figures,
        {"data_fingerprint": "corpus-fp", "tokenizer_fingerprint": "bpe-fp"},
        eval_data,
        run_id,
    )
    tracking.end_run(run_id)
    return output, figures, run_id


def test_gate_moves_champion_only_for_a_better_version(data):
    root, tokenizer_path, tokenizer, corpus, shards = data
    name = f"gate-{uuid.uuid4().hex[:6]}"
    eval_config = EvaluateConfig(max_documents=4)
    base = tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN)
    worse = tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN)
    with torch.no_grad():
        worse.transformer.wte.weight.mul_(200.0)  # confident, random predictions: a far higher loss
    better = fitted(tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN), shards)

    first, first_figures, _ = register(name, checkpoint_of(base, root, f"{name}-base"), data, eval_config)
    assert first.promoted and first.version == "1" and first.champion_value is None
    champion = tracking.version_for_alias(name, CHAMPION)
    assert str(champion.version) == "1"
    assert champion.tags["data_fingerprint"] == "corpus-fp" and champion.tags["tokenizer_fingerprint"] == "bpe-fp"
    assert len(champion.tags["git_commit"]) >= 7

    second, second_figures, run_id = register(name, checkpoint_of(worse, root, f"{name}-worse"), data, eval_config)
    assert second_figures["val_bits_per_byte"] > first_figures["val_bits_per_byte"]
    assert not second.promoted
    assert str(tracking.version_for_alias(name, CANDIDATE).version) == "2"
    assert str(tracking.version_for_alias(name, CHAMPION).version) == "1"
    logged = tracking.get_run(run_id).data
    assert logged.metrics["gate_candidate"] == pytest.approx(second_figures["val_bits_per_byte"])
    assert logged.metrics["gate_champion"] == pytest.approx(first_figures["val_bits_per_byte"])
    assert "does not beat champion version 1" in logged.tags["gate.decision"]

    third, third_figures, _ = register(name, checkpoint_of(better, root, f"{name}-better"), data, eval_config)
    assert third_figures["val_bits_per_byte"] < first_figures["val_bits_per_byte"]
    assert third.promoted
    assert str(tracking.version_for_alias(name, CHAMPION).version) == "3"
    assert str(tracking.version_for_alias(name, CANDIDATE).version) == "3"


def test_champion_is_evaluated_again_on_new_evaluation_data(data, capsys):
    root, tokenizer_path, tokenizer, corpus, shards = data
    name = f"regate-{uuid.uuid4().hex[:6]}"
    eval_config = EvaluateConfig()
    champion_model = tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN, seed=1)
    _, recorded, _ = register(name, checkpoint_of(champion_model, root, f"{name}-1"), data, eval_config)

    # The gate now scores on other documents: the figure recorded for the champion does not apply.
    new_data = eval_data_of(root, tokenizer_path, tokenizer, OTHER_TEXTS, f"{name}-new")
    candidate = tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN, seed=2)
    capsys.readouterr()
    output, _, _ = register(name, checkpoint_of(candidate, root, f"{name}-2"), new_data, eval_config)
    # The re-evaluation shows its own progress, each phase to its end (plain lines: not a terminal).
    phases = phase_lines(capsys.readouterr().out, CHAMPION_STAGE)
    assert list(phases) == ["held-out documents", "val windows"]
    assert all(steps[0][0] == 0 and steps[-1][0] == steps[-1][1] for steps in phases.values())
    *_, new_corpus, new_shards = new_data
    expected = evaluate_model(champion_model, tokenizer, eval_config, new_shards, new_corpus)["val_bits_per_byte"]
    assert expected != pytest.approx(recorded["val_bits_per_byte"], rel=1e-3)  # reusing it would fail below
    assert output.champion_value == pytest.approx(expected, rel=1e-5)


def test_champion_with_a_shorter_context_is_compared_on_documents_only(data):
    root, tokenizer_path, tokenizer, corpus, shards = data
    name = f"context-{uuid.uuid4().hex[:6]}"
    # The champion's context holds half a val window; its recorded figure came from other data.
    short = tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN // 2, seed=4)
    register(
        name,
        checkpoint_of(short, root, f"{name}-short"),
        data,
        EvaluateConfig(max_windows=2),
        metrics={"val_bits_per_byte": 99.0, "doc_bits_per_byte": 99.0},
    )

    candidate = tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN, seed=5)
    kept, _, _ = register(name, checkpoint_of(candidate, root, f"{name}-long"), data, EvaluateConfig())
    assert not kept.promoted and kept.champion_value is None
    assert "context differs" in kept.decision and str(tracking.version_for_alias(name, CHAMPION).version) == "1"

    # Gated on the held-out documents, which each model reads with its own context.
    other = tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN, seed=6)
    doc_gate = RegisterConfig(gate_metric="doc_bits_per_byte")
    compared, _, _ = register(name, checkpoint_of(other, root, f"{name}-doc"), data, EvaluateConfig(), config=doc_gate)
    expected = document_figures(short, tokenizer, EvaluateConfig(), corpus)["doc_bits_per_byte"]
    assert compared.champion_value == pytest.approx(expected, rel=1e-5)


def test_a_benchmark_gate_scores_the_champion_again_on_new_benchmark_data(data):
    root, tokenizer_path, tokenizer, corpus, shards = data
    name = f"bench-{uuid.uuid4().hex[:6]}"
    gate = RegisterConfig(gate_metric="mc_acc_norm")

    def benchmark_config(label, texts):
        rows = [{"context": text[:12], "choices": [text[12:30], text[30:40] or "x", "y"], "label": 0} for text in texts]
        path = root / f"{name}-{label}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        benchmark = BenchmarkConfig(name="mc", kind="multiple_choice", source=str(path))
        return EvaluateConfig(max_windows=2, max_documents=1, benchmarks=[benchmark])

    champion_model = tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN, seed=7)
    first, recorded, _ = register(
        name, checkpoint_of(champion_model, root, f"{name}-1"), data, benchmark_config("one", TEXTS), config=gate
    )
    assert first.promoted and "mc_acc_norm" in recorded and "mc_acc" in recorded

    # Other benchmark rows: the recorded figure does not apply, the champion is scored on the new ones.
    new = benchmark_config("two", OTHER_TEXTS)
    candidate = tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN, seed=8)
    output, _, _ = register(
        name, checkpoint_of(candidate, root, f"{name}-2"), data, new, metrics={"mc_acc_norm": 1.5}, config=gate
    )
    expected = benchmark_figures(champion_model, tokenizer, new.benchmarks[0], batch_size=4)["mc_acc_norm"]
    assert output.champion_value == expected
    assert output.promoted  # accuracy wins upwards: 1.5 beats any share


def test_registered_weights_load_back_exactly_and_register_once(data):
    root, tokenizer_path, tokenizer, corpus, shards = data
    name = f"load-{uuid.uuid4().hex[:6]}"
    model = tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN, seed=3)
    checkpoint = checkpoint_of(model, root, name)
    register(name, checkpoint, data, EvaluateConfig(), metrics={"val_bits_per_byte": 1.0})
    again, _, _ = register(name, checkpoint, data, EvaluateConfig(), metrics={"val_bits_per_byte": 1.0})
    assert again.version == "1" and "nothing new registered" in again.decision
    loaded = load_registered_model(f"models:/{name}@{CHAMPION}")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    assert loaded.tokenizer.read_text() == tokenizer_path.read_text()
    assert loaded.weights.name == "model.safetensors"
    assert loaded.tags[WEIGHTS_TAG] == sha256_file(checkpoint / "model.safetensors")


def test_an_accuracy_gate_promotes_the_higher_figure(data):
    root, tokenizer_path, tokenizer, corpus, shards = data
    name = f"accuracy-{uuid.uuid4().hex[:6]}"
    gate, eval_config = RegisterConfig(gate_metric="val_accuracy"), EvaluateConfig()
    models = [tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN, seed=seed) for seed in (7, 8, 9)]

    def registered(model, label, accuracy):  # figures given: the recorded ones are compared
        return register(
            name,
            checkpoint_of(model, root, f"{name}-{label}"),
            data,
            eval_config,
            metrics={"val_accuracy": accuracy},
            config=gate,
        )[0]

    assert registered(models[0], "first", 0.30).promoted
    assert not registered(models[1], "lower", 0.20).promoted
    assert registered(models[2], "higher", 0.40).promoted
    assert str(tracking.version_for_alias(name, CHAMPION).version) == "3"


def test_unknown_gate_metric_names_the_field(data):
    root = data[0]
    model = tiny_gpt(data[2].get_vocab_size(), SEQ_LEN)
    with pytest.raises(UserError, match="register.gate_metric: 'val_bits_per_byte' is not an evaluation figure"):
        register(
            "unknown-metric", checkpoint_of(model, root, "unknown"), data, EvaluateConfig(), metrics={"val_loss": 1.0}
        )


def test_the_logged_model_carries_its_evaluation_signature_and_input_example(data, caplog):
    from mlflow import MlflowClient
    from mlflow.models import Model
    from mlflow.types import DataType

    from tasks.tracking.registry import INPUT_EXAMPLE, PARAM_DEFAULTS

    root, _, tokenizer, _, _ = data
    name = f"logged-{uuid.uuid4().hex[:6]}"
    checkpoint = checkpoint_of(tiny_gpt(tokenizer.get_vocab_size(), SEQ_LEN, seed=5), root, name)
    figures = {"val_bits_per_byte": 1.25, "val_loss": 2.5}
    output, _, _ = register(name, checkpoint, data, EvaluateConfig(), metrics=figures)
    client = MlflowClient()
    source = client.get_model_version(name, output.version).source  # models:/m-<id>
    logged = client.get_logged_model(source.removeprefix("models:/"))
    assert {metric.key: metric.value for metric in logged.metrics} == figures
    model = Model.load(source)
    assert model.signature.inputs.input_types() == [DataType.string]
    assert {param.name: param.default for param in model.signature.params.params} == PARAM_DEFAULTS
    model_dir = tracking.download_model(source)
    assert (model.load_input_example(model_dir), model.load_input_example_params(model_dir)) == INPUT_EXAMPLE
    assert "Failed to validate" not in caplog.text  # MLflow ran the model on the example when logging it


def test_the_champion_is_evaluated_again_on_the_configured_device(data, monkeypatch):
    root, tokenizer_path, tokenizer, corpus, shards = data
    name = f"device-{uuid.uuid4().hex[:6]}"
    checkpoint = checkpoint_of(tiny_gpt(tokenizer.get_vocab_size(), block_size=SEQ_LEN), root, name)
    eval_config = EvaluateConfig(prompts=[])
    _, figures, _ = register(name, checkpoint, data, eval_config)

    stand_in_gpus(monkeypatch, ["NVIDIA H200", "NVIDIA H200"])
    moves = record_module_moves(monkeypatch)
    figure = champion_figure(
        RegisterConfig(),
        f"models:/{name}@{CHAMPION}",
        tokenizer_path,
        EvalData(eval_config, shards, corpus),
        device="cuda:1",
    )
    assert moves[-1] == torch.device("cuda", 1)  # read from the registry, then moved there to be scored
    assert figure == pytest.approx(figures["val_bits_per_byte"])


def test_the_registered_generator_loads_on_a_gpu_and_moves_on_request(data, monkeypatch):
    root, tokenizer_path, tokenizer, corpus, shards = data
    name = f"pyfunc-{uuid.uuid4().hex[:6]}"
    model = tiny_gpt(tokenizer.get_vocab_size(), block_size=SEQ_LEN)
    output, _, _ = register(name, checkpoint_of(model, root, name), data, EvaluateConfig(prompts=[]))

    stand_in_gpus(monkeypatch, ["NVIDIA H100 80GB HBM3"])
    moves = record_module_moves(monkeypatch)
    generator = tracking.load_text_generator(output.model_uri)
    assert moves == [torch.device("cuda", 0)]  # auto: the first GPU
    greedy = {"max_new_tokens": 4, "temperature": 0.0}
    on_cpu = generator.predict(["def add("], params={**greedy, "device": "cpu"})
    assert moves[-1] == torch.device("cpu")
    eos = special_ids(tokenizer).eos
    prompt = [eos, *tokenizer.encode("def add(", add_special_tokens=False).ids]
    expected = generate(model, [prompt], 4, temperature=0.0, eos_id=eos)[0]
    assert on_cpu == [tokenizer.decode(expected, skip_special_tokens=True)]
    with pytest.raises(UserError, match=r"the device param: cuda:3 is not a device here; this machine has 1 CUDA"):
        generator.predict(["def add("], params={**greedy, "device": "cuda:3"})
