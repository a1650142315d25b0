"""Real models in and out (issue 15): start the pipeline from a Hugging Face GPT-2 directory,
export the result to Hugging Face, generate from a checkpoint, an HF directory and a registered
model. The reference is always transformers' own model (logits, greedy generate), never gptflow.

One pipeline run from `model.init_from` (a tiny random GPT2LMHeadModel saved offline, see
tests/support/hf.py) is shared by the assertions of this module.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli.app import app
from flows.pipeline import pipeline
from flows.pipeline_config import load_config
from model.checkpoint import TOKENIZER, read_tokens
from model.special_tokens import EOS, PAD, SEP
from support.configs import write_pipeline_config

transformers = pytest.importorskip("transformers")
PROMPTS = ["def plus", "class"]


@pytest.fixture(scope="module")
def hf_dir(tiny_gpt2):
    return tiny_gpt2


@pytest.fixture(scope="module")
def init_config(tmp_path_factory, hf_dir):
    """The micro pipeline, started from the HF directory: no bpe section, no model shape."""
    root = tmp_path_factory.mktemp("interop")
    path = write_pipeline_config(root, name=f"interop-{uuid.uuid4().hex[:6]}")
    config = yaml.safe_load(path.read_text())
    del config["bpe"]
    config["model"] = {"init_from": str(hf_dir)}
    config["pretrain"]["max_steps"] = 4
    config["finetune"]["max_steps"] = 3
    config["finetune"]["seq_len"] = 32  # the pretrained model's context is 128
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run(prefect_server, init_config):
    return pipeline(load_config(init_config))


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def test_the_pretrained_tokenizer_replaces_the_trained_one(run, init_config, hf_dir):
    config = load_config(init_config)
    (bpe_manifest,) = (config.workspace / "bpe").glob("*/manifest.json")
    report = json.loads(bpe_manifest.read_text())["report"]
    assert report["trained"] is False and report["init_from"] == str(hf_dir)
    tokenizer = json.loads((bpe_manifest.parent / "tokenizer.json").read_text())
    ids = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    original = json.loads((hf_dir / "tokenizer.json").read_text())
    eos = next(token["id"] for token in original["added_tokens"] if token["content"] == EOS)
    assert ids == {EOS: eos, PAD: eos + 1, SEP: eos + 2}  # its own end of text kept, the others added after
    (shard_manifest,) = (config.workspace / "shard").glob("*/manifest.json")
    assert json.loads(shard_manifest.read_text())["eos_id"] == eos


def test_checkpoints_are_self_contained_and_finetuned_ones_say_so(run):
    finetuned = run.final_checkpoint
    assert (finetuned / TOKENIZER).is_file()
    assert read_tokens(finetuned).prompt_format == "pair"
    (pretrained,) = (finetuned.parents[3] / "pretrain").glob("*/checkpoints/step-*")
    assert read_tokens(pretrained).prompt_format == "document"


def test_pretraining_starts_from_the_pretrained_weights(hf_dir, tmp_path):
    """init_from → gptflow's logits equal transformers' on the original vocabulary's columns."""
    from tasks.models.sources import open_model

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    source = open_model(str(hf_dir))
    vocab = hf_model.config.vocab_size
    assert source.model.config.vocab_size == vocab + 2  # <|pad|> and <|sep|>
    tokens = torch.randint(0, vocab, (2, 20))
    with torch.no_grad():
        ours = source.model.eval()(tokens, fp32_logits=True).logits
        torch.testing.assert_close(ours[..., :vocab], hf_model(tokens).logits, atol=1e-5, rtol=1e-4)
        # The added rows are the mean of the trained ones.
        wte = source.model.transformer.wte.weight
        torch.testing.assert_close(wte[vocab:], wte[:vocab].mean(0).expand(2, -1))


def test_export_loads_in_transformers_and_generates_what_gptflow_generates(run, tmp_path):
    out = tmp_path / "exported"
    cli("export", str(run.final_checkpoint), str(out))
    names = {path.name for path in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "README.md",
    } <= names
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["top_k"] == 40
    assert generation["pad_token_id"] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(PAD)
    card = (out / "README.md").read_text()
    assert f"| checkpoint | {run.final_checkpoint} |" in card
    assert "| MLflow run | unknown |" in card  # a bare checkpoint does not know its run
    assert "prompt with `prompt <|sep|>`" in card

    # The fine-tuned model is prompted as `prompt <|sep|>`: transformers' greedy generate on that.
    prompt = "def plus"
    ids = [*tokenizer(prompt, add_special_tokens=False)["input_ids"], tokenizer.sep_token_id]
    with torch.no_grad():
        hf_out = model.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    expected = tokenizer.decode(hf_out[0, len(ids) :], skip_special_tokens=True)
    assert hf_out.shape[1] - len(ids) == 6  # six tokens, not only an end of text (which any model could match)
    output = cli("generate", str(out), "-p", prompt, "--temperature", "0", "--max-new-tokens", "6")
    assert output.startswith(prompt + expected + "\n")


def test_export_of_a_registered_model_names_its_run(run, tmp_path):
    out = tmp_path / "registered"
    cli("export", run.registered.model_uri, str(out))
    card = (out / "README.md").read_text()
    for known in ("MLflow run", "corpus (ingest) fingerprint", "tokenizer (bpe) fingerprint", "shards fingerprint"):
        assert f"| {known} | unknown |" not in card, known  # the version's tags carry them
    assert f"| registered model | {run.registered.model_uri} |" in card


def test_generate_gives_one_greedy_text_from_a_checkpoint_an_hf_dir_and_the_registry(run, tmp_path):
    out = tmp_path / "hf"
    cli("export", str(run.final_checkpoint), str(out))
    greedy = ["--temperature", "0", "--max-new-tokens", "6", "-p", PROMPTS[0], "-p", PROMPTS[1]]
    texts = {
        source: cli("generate", source, *greedy)
        for source in (str(run.final_checkpoint), str(out), run.registered.model_uri)
    }
    assert len(set(texts.values())) == 1, texts
    streamed = cli("generate", str(run.final_checkpoint), *greedy, "--stream")
    assert streamed.replace("\n", "") == next(iter(texts.values())).replace("\n", "")


def test_the_registered_model_prompts_as_generate_does(run, tmp_path):
    """The pyfunc takes the same examples and format as `gptflow generate`, and by default
    prompts the fine-tuned model in its fine-tuning format."""
    from tasks import tracking

    examples = tmp_path / "examples.jsonl"
    examples.write_text(json.dumps({"prompt": "def one", "completion": "    return 1"}) + "\n")
    generator = tracking.load_text_generator(run.registered.model_uri)
    greedy = {"max_new_tokens": 6, "temperature": 0.0}
    uri, cli_greedy = run.registered.model_uri, ["--temperature", "0", "--max-new-tokens", "6", "-p", "def plus"]
    for params, options in (
        ({}, []),
        ({"examples": examples.read_text()}, ["--examples", str(examples)]),
        ({"prompt_format": "document"}, ["--format", "document"]),
    ):
        (completion,) = generator.predict(["def plus"], params={**greedy, **params})
        assert cli("generate", uri, *cli_greedy, *options).startswith(f"def plus{completion}\n"), params


def test_the_held_out_table_has_zero_shot_primed_and_finetuned_rows(run):
    metrics = json.loads((run.final_checkpoint.parents[1] / "metrics.json").read_text())
    for row in ("pretrained", "primed", "finetuned"):
        assert f"{row}_completion_loss" in metrics and f"{row}_parse_rate" in metrics, row
    # At most the config's default K = 3 (the micro pairs rarely fit a 32-token row beside the query:
    # the primed row's figures against a hand computation are in tests/unit/test_finetune.py).
    assert 0 <= metrics["primed_examples"] <= 3


def test_shots_prime_with_the_configs_pairs(run, init_config):
    from tasks.finetune import load_pairs
    from tasks.finetune_priming import priming_order
    from tasks.models.sources import open_model

    config = load_config(init_config)
    (corpus,) = (config.workspace / "ingest").glob("*/corpus.parquet")
    tokenizer = open_model(str(run.final_checkpoint)).tokenizer

    def length(text):
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    # The first pair in the stage's seeded order that fits 128 - 4 tokens beside `def plus <|sep|>`.
    ordered = priming_order(load_pairs(config.finetune, corpus).train, config.finetune.seed)
    first = next(p for p in ordered if length(p.prompt) + length(p.completion) + 2 + length("def plus") + 1 <= 124)
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(run.final_checkpoint),
            "-p",
            "def plus",
            "--shots",
            "1",
            "--config",
            str(init_config),
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ],
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    # The same text as priming with that pair from a file.
    examples = init_config.parent / "first.jsonl"
    examples.write_text(json.dumps({"prompt": first.prompt, "completion": first.completion}) + "\n")
    by_file = cli(
        "generate",
        str(run.final_checkpoint),
        "-p",
        "def plus",
        "--examples",
        str(examples),
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    )
    assert result.stdout == by_file
