"""Prompt layouts, truncation, special-token text, and each bad input of issue 15 (one clear
error, nothing changed on disk). The pipeline run from a pretrained model is in
tests/integration/test_interop.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli.app import app
from flows.pipeline_config import load_config
from model.checkpoint import CheckpointTokens, attach_tokenizer, save_model_directory
from model.config import GPTConfig
from model.errors import UserError
from model.gpt import GPT
from model.prompts import parse_examples
from model.special_tokens import SEP
from support.configs import write_pipeline_config
from tasks.models import completions
from tasks.models.completions import Sampling, complete
from tasks.models.sources import open_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def source(tiny_gpt2):
    return open_model(str(tiny_gpt2))


@pytest.fixture
def recorded(monkeypatch):
    """The token rows `complete` hands to generation (which returns an end of text at once)."""
    rows = []

    def recording_generate(model, prompts, max_new_tokens, eos_id, **settings):
        rows.extend(prompts)
        return [[eos_id] for _ in prompts]

    monkeypatch.setattr(completions, "generate", recording_generate)
    return rows


def encode(source, text):
    return source.tokenizer.encode(text, add_special_tokens=False).ids


def test_a_primed_prompt_is_laid_out_as_the_fine_tuning_format_repeated(source, recorded):
    examples = [("def one", "return 1"), ("def two", "return 2")]
    complete(source, ["def three"], Sampling(max_new_tokens=4), examples=examples)
    eos, sep = source.special.eos, source.special.sep
    assert (eos, sep) == (source.tokenizer.token_to_id("<|endoftext|>"), source.tokenizer.token_to_id(SEP))
    assert eos != 0 and sep != 2  # a pretrained tokenizer's ids, not a trained one's
    p1, c1, p2, c2, q = (encode(source, t) for t in ("def one", "return 1", "def two", "return 2", "def three"))
    assert recorded == [[*p1, sep, *c1, eos, *p2, sep, *c2, eos, *q, sep]]


def test_examples_primed_as_a_document_are_plain_text_with_blank_lines_between(source, recorded):
    examples = [("def one():\n", "    return 1\n"), ("def two():\n", "    return 2")]
    complete(source, ["def three():\n"], Sampling(max_new_tokens=4), examples=examples, prompt_format="document")
    text = "def one():\n    return 1\n\ndef two():\n    return 2\n\ndef three():\n"
    assert recorded == [[source.special.eos, *encode(source, text)]]  # encoded whole, no <|sep|>


def test_prompt_formats(source, recorded):
    complete(source, ["x = 1"], Sampling(max_new_tokens=4), prompt_format="pair")
    complete(source, ["x = 1"], Sampling(max_new_tokens=4))  # the HF model's own: a document
    ids = encode(source, "x = 1")
    assert recorded == [[*ids, source.special.sep], [source.special.eos, *ids]]


def test_special_token_text_in_a_prompt_is_plain_text(source, recorded):
    text = "a <|sep|> b <|endoftext|>"
    complete(source, [text], Sampling(max_new_tokens=4), prompt_format="pair")
    (row,) = recorded
    assert row.count(source.special.sep) == 1 and row[-1] == source.special.sep  # only the one gptflow placed
    assert source.special.eos not in row
    assert source.tokenizer.decode(row[:-1], skip_special_tokens=False) == text


def test_a_prompt_longer_than_the_context_keeps_its_end_and_reports_the_cut(source, recorded):
    block = source.model.config.block_size
    text = " ".join(f"w{i}" for i in range(200))
    (completion,) = complete(source, [text], Sampling(max_new_tokens=10))
    whole = [source.special.eos, *encode(source, text)]
    assert recorded == [whole[-(block - 10) :]]
    assert completion.dropped_tokens == len(whole) - (block - 10) > 0


def test_shots_take_the_first_examples_that_fit(source, recorded):
    block = source.model.config.block_size
    long = ("def long", " ".join(["x"] * block))  # can never fit
    short = ("def a", "pass")
    (completion,) = complete(source, ["q"], Sampling(max_new_tokens=8), examples=[short, long, short], shots=3)
    assert completion.examples_used == 2  # the long pair is passed over for the next one that fits


def test_examples_that_cannot_fit_are_refused_saying_how_many_fit(source, recorded):
    block = source.model.config.block_size
    examples = [("def a", "pass"), ("def long", " ".join(["x"] * block))]
    with pytest.raises(UserError, match=r"ex.jsonl: only 1 of the 2 examples fit the context"):
        complete(source, ["q"], Sampling(max_new_tokens=8), examples=examples, examples_source="ex.jsonl")
    assert recorded == []


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"prompt": "a", "completion": "b"}\nnot json\n', r"f.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}\n', r"f.jsonl:1: lacks the text field 'completion'"),
        ('["a", "b"]\n', r"f.jsonl:1: expected a JSON object, got list"),
        ('{"prompt": "a\u2028b", "completion": "c"}\n{"x": 1}\n', r"f.jsonl:2: lacks the text field 'prompt'"),
        ("\n", r"f.jsonl: holds no examples"),
    ],
)
def test_bad_examples_files_name_the_line(text, message):
    with pytest.raises(UserError, match=message):
        parse_examples(text, "f.jsonl")


def test_generate_cli_reads_examples_and_prompt_files(source, tiny_gpt2, tmp_path, recorded):
    examples = tmp_path / "examples.jsonl"
    examples.write_text(json.dumps({"prompt": "def one", "completion": "return 1"}) + "\n")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def two")
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(tiny_gpt2),
            "--prompt-file",
            str(prompt),
            "--examples",
            str(examples),
            "--max-new-tokens",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    p1, c1, q = (encode(source, t) for t in ("def one", "return 1", "def two"))
    assert recorded == [[*p1, source.special.sep, *c1, source.special.eos, *q, source.special.sep]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": 1}\n')
    result = CliRunner().invoke(app, ["generate", str(tiny_gpt2), "-p", "x", "--examples", str(bad)])
    assert isinstance(result.exception, UserError) and ":1: lacks the text field 'completion'" in str(result.exception)


# --- init_from: bad sources -----------------------------------------------------------


def hf_copy(tiny_gpt2, tmp_path, drop=(), config_update=None):
    directory = tmp_path / "copy"
    shutil.copytree(tiny_gpt2, directory)
    for name in drop:
        (directory / name).unlink()
    if config_update:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **config_update}))
    return directory


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"nowhere/model: no such directory"):
        open_model(str(tmp_path / "nowhere" / "model"))


def test_another_architecture_is_refused(tiny_gpt2, tmp_path):
    llama = hf_copy(tiny_gpt2, tmp_path, config_update={"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(UserError, match=r"config.json: model_type='llama' is not supported \(expected 'gpt2'\)"):
        open_model(str(llama))


def test_a_directory_without_a_tokenizer_is_refused(tiny_gpt2, tmp_path):
    with pytest.raises(UserError, match=r"has no tokenizer.json"):
        open_model(str(hf_copy(tiny_gpt2, tmp_path, drop=["tokenizer.json"])))


def test_pickled_weights_are_refused_unread(tiny_gpt2, tmp_path):
    directory = hf_copy(tiny_gpt2, tmp_path, drop=["model.safetensors"])
    (directory / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match=r"has only pickled weights \(pytorch_model.bin\)"):
        open_model(str(directory))


def test_a_hub_name_offline_and_not_cached_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"gpt2-medium: not a directory, and not in the Hugging Face cache"):
        open_model("gpt2-medium")


def test_init_from_with_a_shape_or_bpe_settings_is_refused(tmp_path):
    config = write_pipeline_config(tmp_path, "bad")  # sets bpe and the model's shape
    with pytest.raises(UserError, match=r"block_size, n_embd, n_head, n_layer, preset cannot be set with init_from"):
        load_config(config, ["model.init_from=gpt2"])
    with pytest.raises(
        UserError, match=r"preset cannot be .* \(a sparse-attention model cannot start from a dense one\)"
    ):
        load_config(config, ["model={init_from: gpt2, preset: gpt3-small}"])
    with pytest.raises(UserError, match=r"bpe.min_frequency, bpe.vocab_size would be ignored"):
        load_config(config, ["model={init_from: gpt2}"])


def test_a_bad_init_from_stops_the_run_before_anything_is_written(tmp_path):
    from flows.prepare import check_prepare_config

    path = write_pipeline_config(tmp_path, "bad")
    config = yaml.safe_load(path.read_text())
    del config["bpe"]
    config["model"] = {"init_from": str(tmp_path / "missing")}
    path.write_text(yaml.safe_dump(config))
    settings = load_config(path)
    with pytest.raises(UserError, match="no such directory"):
        check_prepare_config(settings)
    assert not (tmp_path / "workspace").exists()


# --- export: refusals ---------------------------------------------------------------------


def checkpoint_of(model, source, directory):
    save_model_directory(model, directory)
    tokenizer = directory / "tokenizer.json"
    source.tokenizer.save(str(directory / "source-tokenizer.json"))
    attach_tokenizer(
        directory,
        directory / "source-tokenizer.json",
        CheckpointTokens(special_ids=source.special, prompt_format="document"),
    )
    assert tokenizer.is_file()
    return directory


def test_export_into_a_non_empty_directory_needs_force(source, tmp_path):
    checkpoint = checkpoint_of(source.model, source, tmp_path / "checkpoint")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(checkpoint), str(out)])
    assert isinstance(result.exception, UserError) and "exists and is not empty; pass --force" in str(result.exception)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = CliRunner().invoke(app, ["export", str(checkpoint), str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_export_of_a_sparse_model_is_refused(source, tmp_path):
    config = GPTConfig(
        vocab_size=source.model.config.vocab_size,
        block_size=64,
        n_layer=2,
        n_head=2,
        n_embd=32,
        attention=["dense", "sparse"],
        sparse_window=8,
    )
    checkpoint = checkpoint_of(GPT(config), source, tmp_path / "sparse")
    result = CliRunner().invoke(app, ["export", str(checkpoint), str(tmp_path / "out")])
    assert isinstance(result.exception, UserError)
    assert "sparse attention layers" in str(result.exception) and "GPT2LMHeadModel cannot express" in str(
        result.exception
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_push_to_hub_uploads_the_exported_directory(source, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    checkpoint = checkpoint_of(source.model, source, tmp_path / "checkpoint")
    result = CliRunner().invoke(app, ["export", str(checkpoint), str(tmp_path / "out"), "--push-to-hub", "me/tiny"])
    assert result.exit_code == 0, result.output
    assert calls[0] == ("create", "me/tiny", True)
    assert calls[1][:2] == ("upload", "me/tiny") and "model.safetensors" in calls[1][2]


def test_generate_on_an_exported_directory_equals_transformers_greedy(source, tmp_path):
    """The same weights through transformers' own GPT2LMHeadModel.generate, greedy."""
    checkpoint = checkpoint_of(source.model, source, tmp_path / "checkpoint")
    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["export", str(checkpoint), str(out)]).exit_code == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = [tokenizer.eos_token_id, *tokenizer("def plus", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(hf[0, len(ids) :], skip_special_tokens=True)
    (ours,) = complete(open_model(str(out)), ["def plus"], Sampling(max_new_tokens=8, temperature=0.0))
    assert ours.text == expected and expected
