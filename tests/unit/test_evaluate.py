"""Evaluation math against hand computations, and the evaluate stage on micro inputs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from prefect import flow, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from torch import nn

from model.checkpoint import load_model
from model.data import ShardManifest
from model.errors import UserError
from model.gpt import GPTOutput
from model.scoring import IGNORE, VAL_WINDOWS, score_batches, sliding_window_batches, sliding_windows, window_batches
from model.special_tokens import special_ids
from model.train import RunSpec, run
from support.configs import MICRO_GPT, micro_train_config
from support.corpus import TEXTS, make_shards, toy_tokenizer, write_corpus, write_val_shards
from support.devices import record_module_moves, stand_in_gpus
from support.models import perturbed, save_base_checkpoint, tiny_gpt
from support.progress import phase_lines
from tasks import tracking
from tasks.bpe import load_tokenizer, token_byte_lengths
from tasks.evaluate import EvaluateConfig, evaluate_model, evaluate_task, run_evaluate
from tasks.tracking.stage_run import artifact_key


class Bigram(nn.Module):
    """Next-token logits from the previous token only: a model whose loss is easy to do by hand."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx, targets=None, cache=None, fp32_logits=False):
        return GPTOutput(self.table[idx], None, None)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(toy_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_token_bytes_are_the_utf8_bytes_of_the_text(tokenizer):
    lengths = token_byte_lengths(tokenizer, tokenizer.get_vocab_size())
    assert lengths[:3].tolist() == [0, 0, 0]  # special tokens count no bytes
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        # "✓" and "—" are 3 bytes: some tokens hold part of a character and decode to nothing alone.
        assert sum(lengths[i].item() for i in ids) == len(text.encode("utf-8"))


def test_bits_per_byte_equals_a_hand_computation(tokenizer):
    model = Bigram(tokenizer.get_vocab_size())
    table = model.table.detach().tolist()
    text = TEXTS[1]
    eos = special_ids(tokenizer).eos
    ids = [eos, *tokenizer.encode(text, add_special_tokens=False).ids, eos]

    nats, correct = 0.0, 0
    for previous, token in zip(ids, ids[1:]):
        row = table[previous]
        nats += math.log(sum(math.exp(v) for v in row)) - row[token]
        correct += max(range(len(row)), key=row.__getitem__) == token
    hand_bpb = nats / (math.log(2) * len(text.encode("utf-8")))  # the closing <|endoftext|> adds 0 bytes

    lengths = token_byte_lengths(tokenizer, tokenizer.get_vocab_size())
    totals = score_batches(model, sliding_window_batches([ids], block_size=4, stride=4, batch_size=3), lengths)
    assert totals.tokens == len(ids) - 1
    assert totals.bits_per_byte == pytest.approx(hand_bpb, rel=1e-5)
    assert totals.perplexity == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)
    assert totals.accuracy == correct / (len(ids) - 1)


def naive_sliding_nats(model, tokens, block_size, stride):
    """Each target j scored alone, with the context the method gives it: from the start of
    the first window k (starting at k * stride) whose block_size inputs reach it."""
    nats = 0.0
    for j in range(1, len(tokens)):
        k = max(0, math.ceil((j - block_size) / stride))
        context = torch.tensor([tokens[k * stride : j]])
        assert context.size(1) <= block_size
        logits = model(context).logits[0, -1]
        nats -= torch.log_softmax(logits, dim=-1)[tokens[j]].item()
    return nats


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_sliding_window_scores_each_token_once_with_the_method_context(stride):
    model = tiny_gpt(vocab_size=50, block_size=8).eval()
    generator = torch.Generator().manual_seed(1)
    documents = [torch.randint(3, 50, (n,), generator=generator).tolist() for n in (30, 5, 9)]
    lengths = torch.ones(50, dtype=torch.long)
    totals = score_batches(model, sliding_window_batches(documents, 8, stride, batch_size=4), lengths)
    assert totals.tokens == sum(len(d) - 1 for d in documents)
    naive = sum(naive_sliding_nats(model, d, 8, stride) for d in documents)
    assert totals.nats == pytest.approx(naive, rel=1e-4)


def test_sliding_window_with_stride_equal_to_block_is_the_plain_windowed_loss():
    model = tiny_gpt(vocab_size=50, block_size=8).eval()
    tokens = torch.randint(3, 50, (27,), generator=torch.Generator().manual_seed(2)).tolist()
    plain = 0.0
    for start in range(0, len(tokens) - 1, 8):  # disjoint chunks of 8 inputs, next-token targets
        x, y = tokens[start : start + 8], tokens[start + 1 : start + 9]
        logits = model(torch.tensor([x[: len(y)]])).logits[0]
        plain += F.cross_entropy(logits, torch.tensor(y), reduction="sum").item()
    totals = score_batches(
        model, sliding_window_batches([tokens], 8, 8, batch_size=2), torch.ones(50, dtype=torch.long)
    )
    assert totals.nats == pytest.approx(plain, rel=1e-5)
    windows = list(sliding_windows(tokens, 8, 8))
    assert all(IGNORE not in targets for _, targets in windows)  # disjoint: nothing skipped


def test_stride_outside_the_context_is_refused():
    with pytest.raises(ValueError, match="stride"):
        list(sliding_windows(list(range(20)), 8, 9))


@dataclass
class StageInputs:
    tokenizer: Path
    checkpoint: Path
    shards: Path
    corpus: Path


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """A toy tokenizer, an untrained tiny GPT's checkpoint, a corpus and its val shards."""
    root = tmp_path_factory.mktemp("stage")
    tokenizer_path = toy_tokenizer(root / "tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_path)
    checkpoint = save_base_checkpoint(tiny_gpt(tokenizer.get_vocab_size(), block_size=16), root / "pretrain")
    documents = [("a", TEXTS[0], "train"), ("b", TEXTS[1], "val"), ("c", TEXTS[2], "val")]
    corpus = write_corpus(root / "corpus.parquet", documents)
    shards = write_val_shards(root / "shards", tokenizer, tokenizer_path, TEXTS * 3, seq_len=16)
    return StageInputs(tokenizer_path, checkpoint, shards, corpus)


CONFIG = EvaluateConfig(prompts=["def add(", "héllo"], max_new_tokens=5, stride=4)


def test_evaluate_stage_figures_equal_hand_computations_and_are_reused(tmp_path, stage_inputs):
    s = stage_inputs
    output = run_evaluate(CONFIG, s.checkpoint.parents[1], s.tokenizer, s.shards, s.corpus, tmp_path)
    metrics = output.metrics

    assert output.path == tmp_path / "evaluate" / output.fingerprint
    manifest = json.loads((output.path / "manifest.json").read_text())
    assert manifest["metrics"] == metrics
    assert output.samples.read_text().count("### ") == 2

    model = load_model(s.checkpoint).eval()
    tokenizer = load_tokenizer(s.tokenizer)
    # val_*: plain cross-entropy over every window of the val shard file (fewer than max_windows).
    windows = torch.tensor(pq.read_table(s.shards / "val-00000.parquet").column("tokens").to_pylist())
    inputs, targets = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        logits = model(inputs).logits
    assert metrics["val_tokens"] == targets.numel()
    assert metrics["val_loss"] == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item(), rel=1e-5
    )
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-9)
    assert metrics["val_accuracy"] == (logits.argmax(dim=-1) == targets).sum().item() / targets.numel()
    target_bytes = token_byte_lengths(tokenizer, tokenizer.get_vocab_size())[targets].sum().item()
    assert metrics["val_bits_per_byte"] == pytest.approx(
        metrics["val_loss"] * targets.numel() / (math.log(2) * target_bytes), rel=1e-9
    )

    # doc_*: the val documents of the corpus ("b", "c"), each token scored alone with the
    # context the sliding windows (block_size 16, stride 4) give it; bytes from the text.
    eos = special_ids(tokenizer).eos
    documents = [[eos, *tokenizer.encode(t, add_special_tokens=False).ids, eos] for t in TEXTS[1:]]
    with torch.no_grad():
        nats = sum(naive_sliding_nats(model, d, block_size=16, stride=4) for d in documents)
    scored = sum(len(d) - 1 for d in documents)
    assert metrics["doc_tokens"] == scored
    assert metrics["doc_loss"] == pytest.approx(nats / scored, rel=1e-5)
    text_bytes = sum(len(t.encode("utf-8")) for t in TEXTS[1:])
    assert metrics["doc_bits_per_byte"] == pytest.approx(nats / (math.log(2) * text_bytes), rel=1e-5)

    smaller_batches = CONFIG.model_copy(update={"batch_size": 3})
    again = run_evaluate(smaller_batches, s.checkpoint, s.tokenizer, s.shards, s.corpus, tmp_path)
    assert again.reused and again.path == output.path and again.metrics == output.metrics


def test_each_phase_of_the_evaluation_prints_its_own_progress_to_its_total(tmp_path, stage_inputs, capsys):
    """Off a terminal (pytest's output is not one) each phase prints a line as it starts, after
    its first step and at its end, named by the stage's run and the phase."""
    s = stage_inputs
    config = CONFIG.model_copy(update={"batch_size": 2})
    run_evaluate(config, s.checkpoint, s.tokenizer, s.shards, s.corpus, tmp_path, stage_name="evaluate-pretrained")
    phases = phase_lines(capsys.readouterr().out, "evaluate-pretrained")

    val_batches = math.ceil(pq.read_table(s.shards / "val-00000.parquet").num_rows / 2)
    assert list(phases) == ["held-out documents", "val windows", "samples"]  # the order they run in
    assert phases["val windows"] == [(0, val_batches), (1, val_batches), (val_batches, val_batches)]
    assert phases["samples"][0] == (0, 5) and phases["samples"][-1] == (5, 5)  # max_new_tokens
    steps = phases["held-out documents"]
    assert steps[0][0] == 0 and steps[-1][0] == steps[-1][1] > 1


def test_a_bf16_evaluation_matches_fp32_to_bf16_precision(stage_inputs):
    """The GPU path (bf16 autocast matmuls; fp32 head, logits and loss sums) run on the CPU.

    bf16 keeps 8 significant bits: each matmul output is rounded by up to 2^-9 of its size,
    in either direction, and the mean loss over many tokens averages those roundings out. A
    figure computed from bf16 matmuls cannot be trusted beyond bf16's own precision, 2^-8
    relative, and must not be worse, or a champion's recorded figure and one computed on
    another device would not compare. (Measured: about 5e-5 relative on this model.)"""
    s = stage_inputs
    tokenizer = load_tokenizer(s.tokenizer)
    model = perturbed(load_model(s.checkpoint)).eval()  # larger logits than an untrained model's
    config = CONFIG.model_copy(update={"prompts": []})
    fp32 = evaluate_model(model, tokenizer, config, s.shards, s.corpus)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = evaluate_model(model, tokenizer, config, s.shards, s.corpus)
        logits = model(torch.tensor([[special_ids(tokenizer).eos, 5, 6]]), fp32_logits=True).logits
    assert logits.dtype == torch.float32

    for figure in ("val_loss", "doc_loss", "val_bits_per_byte", "doc_bits_per_byte"):
        assert bf16[figure] != fp32[figure]  # autocast took effect
        assert abs(bf16[figure] - fp32[figure]) <= 2**-8 * fp32[figure], figure
    assert bf16["val_tokens"] == fp32["val_tokens"] and bf16["doc_tokens"] == fp32["doc_tokens"]


def test_evaluation_runs_on_the_configured_device(tmp_path, stage_inputs, monkeypatch):
    s = stage_inputs
    stand_in_gpus(monkeypatch, ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
    moves = record_module_moves(monkeypatch)
    on_gpu = run_evaluate(CONFIG, s.checkpoint, s.tokenizer, s.shards, s.corpus, tmp_path, device="cuda:1")
    assert moves == [torch.device("cuda", 1)]  # the model, loaded once, then everything follows it

    moves.clear()
    again = run_evaluate(CONFIG, s.checkpoint, s.tokenizer, s.shards, s.corpus, tmp_path, device="cpu")
    assert moves == [torch.device("cpu")]
    assert again.reused and again.fingerprint == on_gpu.fingerprint  # the device is in no fingerprint


def test_a_registered_model_evaluates_like_its_checkpoint(tmp_path, stage_inputs):
    s = stage_inputs
    run_id = tracking.start_run("test-evaluate", "register")
    logged = tracking.log_text_generator(
        run_id, s.checkpoint / "model.safetensors", s.checkpoint / "config.json", s.tokenizer
    )
    uri = f"models:/test-evaluate-model/{tracking.register_version(logged, 'test-evaluate-model', tags={})}"

    from_checkpoint = run_evaluate(CONFIG, s.checkpoint, s.tokenizer, s.shards, s.corpus, tmp_path / "ws1")
    from_registry = run_evaluate(CONFIG, uri, s.tokenizer, s.shards, s.corpus, tmp_path / "ws2")
    assert not from_registry.reused
    assert from_registry.fingerprint == from_checkpoint.fingerprint  # the same weights, the same inputs
    throughput = {"eval_tokens_per_s": from_registry.metrics["eval_tokens_per_s"]}
    assert from_registry.metrics == pytest.approx({**from_checkpoint.metrics, **throughput})

    other = toy_tokenizer(tmp_path / "other.json", ["something else entirely"], vocab_size=280)
    with pytest.raises(UserError, match="different tokenizer"):
        run_evaluate(CONFIG, uri, other, s.shards, s.corpus, tmp_path / "ws3")


def test_evaluate_task_logs_a_nested_run_and_headline_figures(tmp_path, stage_inputs, prefect_server):
    s = stage_inputs
    parent = tracking.start_run("test-evaluate", "pipeline")

    @flow
    def pipeline_stage():
        return evaluate_task(
            CONFIG,
            s.checkpoint,
            s.tokenizer,
            s.shards,
            s.corpus,
            tmp_path,
            parent_run_id=parent,
            run_name="evaluate-finetuned",
            parent_prefix="finetuned_",
            return_state=True,
        ).result()

    output = pipeline_stage()

    client = tracking.client()
    (child,) = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert child.info.run_name == "evaluate-finetuned" and child.info.status == "FINISHED"
    assert child.data.metrics["val_bits_per_byte"] == pytest.approx(output.metrics["val_bits_per_byte"])
    parent_metrics = client.get_run(parent).data.metrics
    assert parent_metrics["finetuned_val_bits_per_byte"] == pytest.approx(output.metrics["val_bits_per_byte"])
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "evaluate")}
    assert artifacts == {"evaluate/samples.md", "evaluate/metrics.json"}
    # The samples as MLflow's table: a JSON artifact of columns and rows.
    table = json.loads(Path(client.download_artifacts(child.info.run_id, "samples.json")).read_text())
    assert table["columns"] == ["prompt", "completion"] and [row[0] for row in table["data"]] == CONFIG.prompts
    shown_samples = output.samples.read_text()
    for prompt, completion in table["data"]:
        assert f"```\n{prompt}{completion}\n```" in shown_samples

    # The Prefect markdown artifact (its key is the config, i.e. experiment, and the run name) shows
    # the figures and samples.
    key = artifact_key("test-evaluate", "evaluate-finetuned")
    with get_client(sync_client=True) as prefect:
        markdown = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    [shown] = [a.data for a in markdown if child.info.run_id in a.data]  # the one linking this run
    assert f"| val_bits_per_byte | {output.metrics['val_bits_per_byte']:.4f} |" in shown
    assert output.samples.read_text() in shown


def test_the_training_curves_last_val_loss_is_the_cross_entropy_of_the_evaluated_windows(tmp_path):
    """Training-time validation scores the windows the evaluate stage scores (model.scoring.val_windows):
    by default every window of a small val split, else evenly spaced ones, here picked by hand."""
    shards = make_shards(tmp_path / "shards", {"train": 64, "val": 24})
    windows = torch.tensor(
        [
            w
            for entry in ShardManifest.read(shards).split_files("val")
            for w in pq.read_table(shards.parent / entry.path).column("tokens").to_pylist()
        ]
    )
    assert len(windows) == 24

    def curve(name: str, val_windows: int) -> tuple[dict[int, float], Path]:
        config = micro_train_config(max_steps=4, eval_every=2, checkpoint_every=0)
        logged: dict[int, float] = {}
        result = run(
            RunSpec(model=MICRO_GPT, train=config, shards=shards, val_windows=val_windows, out_dir=tmp_path / name),
            lambda step, metrics: logged.update({step: metrics["val_loss"]} if "val_loss" in metrics else {}),
        )
        return logged, result.checkpoint

    def cross_entropy(checkpoint: Path, rows: list[int]) -> float:
        model = load_model(checkpoint).eval()
        picked = windows[rows]
        with torch.no_grad():
            logits = model(picked[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), picked[:, 1:].flatten()).item()

    every, checkpoint = curve("default", val_windows=VAL_WINDOWS)  # the micro config scores fewer
    assert list(every) == [0, 2, 4]  # 0: the initial weights (eval_at_start)
    assert every[4] == pytest.approx(cross_entropy(checkpoint, list(range(24))), rel=1e-5)

    spaced, checkpoint = curve("five", val_windows=5)
    assert spaced[4] == pytest.approx(cross_entropy(checkpoint, [0, 6, 12, 17, 23]), rel=1e-5)


def test_validation_batches_split_over_ranks_score_every_window_once_in_equal_numbers():
    windows = torch.arange(11 * 5).view(11, 5)  # 11 windows of 4 inputs + 1
    ranks = [list(window_batches(windows, batch_size=2, rank=rank, world_size=2)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # FSDP: every rank runs the same forward passes
    assert all(inputs.shape == targets.shape == (2, 4) for batches in ranks for inputs, targets in batches)
    scored = [row[0].item() for batches in ranks for _, targets in batches for row in targets if row[0] != IGNORE]
    assert sorted(scored) == [window * 5 + 1 for window in range(11)]
    assert list(window_batches(windows, batch_size=4))[-1][0].shape == (3, 4)  # one rank: no padding
