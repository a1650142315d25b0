"""Fine-tuning: the completion-only loss, pair packing, exact resume, and the stage on micro data."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from model.checkpoint import CONFIG, WEIGHTS, latest_checkpoint
from model.errors import UserError
from model.finetune_data import IGNORE, PairBatches, encode_pair, encode_pairs, to_rows
from model.prompts import document_primed_prompt
from model.special_tokens import SpecialIds, special_ids
from model.train import train
from support.corpus import make_shards, toy_tokenizer, write_corpus
from support.devices import record_module_moves, stand_in_gpus
from support.models import perturbed, save_base_checkpoint, tiny_gpt
from support.progress import phase_lines
from tasks import tracking
from tasks.bpe import load_tokenizer
from tasks.core.workspace import sha256_file
from tasks.finetune import (
    FinetuneConfig,
    completes_function,
    finetune_fingerprint,
    finetune_inputs,
    parse_rate,
    primed_figures,
    run_finetune,
)
from tasks.finetune_pairs import Pair, PairSet
from tasks.finetune_priming import function_body

PAIRS = [([10, 11, 12], [20, 21]), ([13, 14], [22, 23, 24]), ([15], [25])]
# Ids as a pretrained tokenizer places them (after its vocabulary), not a trained one's 0, 1, 2.
EOS_ID, PAD_ID, SEP_ID = 27, 28, 29
SPECIAL = SpecialIds(eos=EOS_ID, pad=PAD_ID, sep=SEP_ID)


def hand_completion_nats(logits_row, tokens, pairs):
    """Summed -log p of each pair's completion tokens and closing <|endoftext|>, walking
    the row's layout `prompt <|sep|> completion <|endoftext|>` pair by pair."""
    log_probs = torch.log_softmax(logits_row, dim=-1)
    nats, count, offset = 0.0, 0, 0
    for prompt, completion in pairs:
        first_target = offset + len(prompt) + 1  # the first completion token
        for position in range(first_target, first_target + len(completion) + 1):
            nats -= log_probs[position - 1, tokens[position]].item()
            count += 1
        offset += len(prompt) + len(completion) + 2
    return nats, count


def test_loss_is_the_mean_over_completion_tokens():
    examples, _ = encode_pairs(PAIRS, seq_len=20, too_long="drop", special=SPECIAL)
    inputs, targets = to_rows(examples, seq_len=20, packed=True, special=SPECIAL)
    assert inputs.shape == (1, 20)  # 7 + 7 + 4 tokens share one row
    row = [10, 11, 12, SEP_ID, 20, 21, EOS_ID, 13, 14, SEP_ID, 22, 23, 24, EOS_ID, 15, SEP_ID, 25, EOS_ID]
    assert inputs[0].tolist() == row[:-1] + [PAD_ID] * 3
    model = tiny_gpt(vocab_size=30, block_size=20)
    loss = model(inputs, targets).loss
    nats, count = hand_completion_nats(model(inputs).logits[0], row, PAIRS)  # the whole logits, scored by hand
    assert count == 3 + 4 + 2
    assert loss.item() == pytest.approx(nats / count, rel=1e-5)


def prompt_gradients_are_zero(model, inputs, targets, prompt_positions) -> bool:
    """The mask test: no gradient reaches the logits of positions that predict prompt tokens."""
    logits = model(inputs).logits
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE).backward()
    return bool((logits.grad[0, prompt_positions] == 0).all()) and bool(logits.grad[0].abs().sum() > 0)


def test_prompt_positions_get_no_gradient_and_an_inverted_mask_fails_the_test():
    examples, _ = encode_pairs(PAIRS, seq_len=20, too_long="drop", special=SPECIAL)
    inputs, targets = to_rows(examples, seq_len=20, packed=True, special=SPECIAL)
    # positions whose next token is a prompt token or the separator
    prompt_positions = [0, 1, 2, 6, 7, 8, 13, 14]
    assert prompt_gradients_are_zero(tiny_gpt(30, 20), inputs, targets, prompt_positions)
    inverted = torch.where(targets == IGNORE, torch.cat([inputs[:, 1:], inputs[:, :1]], dim=1), IGNORE)
    inverted[inputs == PAD_ID] = IGNORE
    assert not prompt_gradients_are_zero(tiny_gpt(30, 20), inputs, inverted, prompt_positions)


def test_too_long_pairs_are_truncated_from_the_prompt_left_or_dropped():
    prompt, completion = list(range(10, 20)), [30, 31, 32]
    example = encode_pair(prompt, completion, seq_len=8, too_long="truncate", special=SPECIAL)
    assert example.tokens == [15, 16, 17, 18, 19, SEP_ID, 30, 31, 32, EOS_ID][-9:]
    assert example.scored == [False] * 5 + [True] * 4
    assert encode_pair(prompt, completion, seq_len=8, too_long="drop", special=SPECIAL) is None
    assert (
        encode_pair([1], list(range(30, 40)), seq_len=8, too_long="truncate", special=SPECIAL) is None
    )  # completion alone too long
    too_long = ([1], list(range(30, 40)))
    _, report = encode_pairs([(prompt, completion), ([1], [2]), too_long], 8, "truncate", special=SPECIAL)
    assert (report.pairs, report.truncated, report.dropped) == (2, 1, 1)


def test_unpacked_rows_hold_one_pair_each():
    examples, _ = encode_pairs(PAIRS, seq_len=10, too_long="drop", special=SPECIAL)
    inputs, targets = to_rows(examples, seq_len=10, packed=False, special=SPECIAL)
    assert inputs.shape == (3, 10)
    assert targets[2].tolist() == [IGNORE, 25, EOS_ID] + [IGNORE] * 7


def test_pair_batches_resume_exactly_where_they_stopped():
    inputs = torch.arange(7 * 4).view(7, 4)
    data = PairBatches(inputs, inputs + 100, batch_size=3, seed=5)
    stream = iter(data)
    uninterrupted = [next(stream)[0] for _ in range(6)]  # crosses two epoch boundaries

    first = PairBatches(inputs, inputs + 100, batch_size=3, seed=5)
    first_stream = iter(first)
    [next(first_stream) for _ in range(2)]
    resumed = PairBatches(inputs, inputs + 100, batch_size=3, seed=5)
    resumed.load_state_dict(first.state_dict())
    resumed_stream = iter(resumed)
    assert all(torch.equal(next(resumed_stream)[0], expected) for expected in uninterrupted[2:])
    # every row once per epoch
    assert sorted(torch.cat(uninterrupted[:2] + [uninterrupted[2][:1]])[:, 0].tolist()) == list(range(0, 28, 4))


def test_a_generated_body_counts_only_if_it_adds_code_that_parses():
    prompt = 'def f(x):\n    """Double."""\n'
    assert completes_function(prompt, "    return 2 * x\n")
    assert completes_function(prompt, "    y = x\n    return y")  # no trailing newline needed
    assert not completes_function(prompt, "\n   \n   ")  # the docstring alone parses, but adds nothing
    assert not completes_function(prompt, "    return (x\n")
    assert not completes_function(prompt, "return x\n")  # at module level, not in the function


@pytest.mark.parametrize(
    "body",
    [
        "    return x\n",  # a parameter
        "    import math\n    return math\n",  # bound by the import
        "    for item in x:\n        pass\n    return item\n",  # a loop variable
        "    print(x)\n",  # a call does something
        "    pass\n    return [x]\n",  # one statement that does something is enough
        "    try:\n        pass\n    except ValueError as error:\n        return error\n",
        "    if x:\n        return 1\n",  # a branch, even of constants
    ],
)
def test_a_body_that_does_something_counts(body):
    assert completes_function('def f(x):\n    """Doc."""\n', body)


@pytest.mark.parametrize(
    "body",
    [
        "    pass\n",
        "    ...\n",
        "    return\n",
        "    return None\n",
        "    return 0\n",
        '    """Another docstring."""\n',
        "    x\n",  # a bare name does nothing
        "    return result\n",  # never defined in the function
        "    return math\n",  # a module the function never imported
        "    pass\n    return result\n",
    ],
)
def test_a_body_that_does_nothing_does_not_count(body):
    assert not completes_function('def f(x):\n    """Doc."""\n', body)


# --- the stage ------------------------------------------------------------------------


def test_parse_rate_prompts_leave_room_for_the_body(tmp_path, monkeypatch):
    # Generation past the context recomputes the whole window at every token; a long prompt
    # keeps its end (the docstring's close and <|sep|>) and room for max_new_tokens.
    tokenizer = load_tokenizer(toy_tokenizer(tmp_path / "tokenizer.json"))
    special = special_ids(tokenizer)
    model = tiny_gpt(tokenizer.get_vocab_size(), block_size=32)
    long_prompt = 'def f(x):\n    """' + "word " * 40 + '"""\n'
    pairs = [Pair(long_prompt, "    return x\n"), Pair("def g():\n", "    pass\n")]
    seen = []

    def recording_generate(model, prompts, max_new_tokens, **settings):
        seen.extend(prompts)
        return [[special.eos] for _ in prompts]

    monkeypatch.setattr("tasks.finetune.generate", recording_generate)
    parse_rate(model, tokenizer, pairs, max_new_tokens=8)
    whole = [*tokenizer.encode(long_prompt, add_special_tokens=False).ids, special.sep]
    assert seen[0] == whole[-24:]  # 32 - 8 tokens: the end of the prompt
    assert seen[1] == [*tokenizer.encode("def g():\n", add_special_tokens=False).ids, special.sep]
    parse_rate(model, tokenizer, pairs, max_new_tokens=30)
    assert seen[2] == whole[-16:]  # never under half the context


def test_held_out_scoring_says_what_it_scores_before_its_first_batch(tmp_path, monkeypatch, capsys):
    # Off a terminal (pytest's output), each scoring phase prints a plain line as it starts and as it ends.
    tokenizer = load_tokenizer(toy_tokenizer(tmp_path / "tokenizer.json"))
    special = special_ids(tokenizer)
    model = tiny_gpt(tokenizer.get_vocab_size(), block_size=32)
    monkeypatch.setattr("tasks.finetune.GENERATION_BATCH", 1)
    monkeypatch.setattr(
        "tasks.finetune.generate", lambda model, prompts, *args, **kwargs: [[special.eos]] * len(prompts)
    )
    pairs = [Pair("def f(x):\n", "    return x\n"), Pair("def g():\n", "    pass\n")]
    parse_rate(model, tokenizer, pairs, max_new_tokens=8, phase="parse rate, pretrained")
    first, middle, last = capsys.readouterr().out.splitlines()
    assert (first, last) == ("finetune: parse rate, pretrained 0/2", "finetune: parse rate, pretrained 2/2")
    assert re.fullmatch(r"finetune: parse rate, pretrained 1/2 \(about \d+ s left\)", middle)


def module(i: int) -> str:
    return "".join(
        f'def add_{i}_{j}(x):\n    """Return x plus {j}."""\n    y = x + {j}\n    return y\n\n\n' for j in range(6)
    )


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    documents = [(f"m{i}.py", module(i), "val" if i % 4 == 0 else "train") for i in range(12)]
    corpus = write_corpus(root / "corpus.parquet", documents)
    tokenizer_path = toy_tokenizer(root / "tokenizer.json", [text for _, text, _ in documents], vocab_size=320)
    vocab = load_tokenizer(tokenizer_path).get_vocab_size()
    save_base_checkpoint(tiny_gpt(vocab, block_size=64), root / "pretrain")
    config = FinetuneConfig(
        max_steps=12,
        lr=3e-3,
        warmup_steps=2,
        batch_tokens=256,
        micro_batch_size=4,
        checkpoint_every=5,
        device="cpu",
        eval_pairs=4,
        eval_max_new_tokens=12,
    )
    return root, corpus, tokenizer_path, config


def test_finetuning_lowers_the_held_out_completion_loss(micro_run):
    root, corpus, tokenizer_path, config = micro_run
    output = run_finetune(config, root / "pretrain", tokenizer_path, corpus, root / "ws")

    metrics = output.metrics
    assert metrics["finetuned_completion_loss"] < metrics["pretrained_completion_loss"] - 0.5
    assert metrics["finetuned_completion_perplexity"] == pytest.approx(math.exp(metrics["finetuned_completion_loss"]))
    assert 0 <= metrics["pretrained_parse_rate"] <= 1 and 0 <= metrics["finetuned_parse_rate"] <= 1
    assert 0 < metrics["primed_examples"] <= 3 and 0 <= metrics["primed_parse_rate"] <= 1  # the primed row
    assert (metrics["train_pairs"], metrics["val_pairs"]) == (54, 18)
    assert output.checkpoint == output.path / "checkpoints" / "step-12"
    manifest = json.loads((output.path / "manifest.json").read_text())
    assert manifest["checkpoint"] == "checkpoints/step-12" and manifest["metrics"] == metrics

    again = run_finetune(
        config.model_copy(update={"device": "auto", "resume": False}),
        root / "pretrain",
        tokenizer_path,
        corpus,
        root / "ws",
    )
    assert again.reused and again.path == output.path


def test_an_interrupted_finetune_resumes_to_the_same_weights(micro_run):
    root, corpus, tokenizer_path, config = micro_run
    uninterrupted = run_finetune(config, root / "pretrain", tokenizer_path, corpus, root / "ws")

    first_steps, resumed_steps = [], []

    def crash_after_step_7(step, metrics):
        first_steps.append(step)
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, root / "pretrain", tokenizer_path, corpus, root / "ws2", callback=crash_after_step_7)
    assert first_steps == list(range(1, 8))
    assert not (root / "ws2" / "finetune" / uninterrupted.fingerprint / "manifest.json").exists()
    resumed = run_finetune(
        config,
        root / "pretrain",
        tokenizer_path,
        corpus,
        root / "ws2",
        callback=lambda step, metrics: resumed_steps.append(step),
    )
    # checkpoint_every 5: steps 6 and 7 are lost with the crash and run again from step-5.
    assert resumed_steps == list(range(6, 13))
    assert resumed.fingerprint == uninterrupted.fingerprint and not resumed.reused

    expected = safetensors.torch.load_file(uninterrupted.checkpoint / WEIGHTS)
    actual = safetensors.torch.load_file(resumed.checkpoint / WEIGHTS)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    # The same weights give the same held-out figures, and the last step's loss is the same.
    assert resumed.metrics == uninterrupted.metrics


def test_a_registered_model_finetunes_like_its_checkpoint(micro_run, tmp_path):
    root, corpus, tokenizer_path, config = micro_run
    checkpoint = latest_checkpoint(root / "pretrain" / "checkpoints")
    run_id = tracking.start_run("test-finetune", "register")
    logged = tracking.log_text_generator(run_id, checkpoint / WEIGHTS, checkpoint / CONFIG, tokenizer_path)
    tracking.set_alias("test-finetune-base", "base", tracking.register_version(logged, "test-finetune-base", tags={}))

    short = config.model_copy(update={"max_steps": 3})
    from_checkpoint = run_finetune(short, root / "pretrain", tokenizer_path, corpus, tmp_path / "ws1")
    from_registry = run_finetune(short, "models:/test-finetune-base@base", tokenizer_path, corpus, tmp_path / "ws2")
    assert not from_registry.reused and from_registry.fingerprint == from_checkpoint.fingerprint
    expected = safetensors.torch.load_file(from_checkpoint.checkpoint / WEIGHTS)
    actual = safetensors.torch.load_file(from_registry.checkpoint / WEIGHTS)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_finetuning_runs_on_the_configured_device(micro_run, tmp_path, monkeypatch):
    root, corpus, tokenizer_path, config = micro_run
    stand_in_gpus(monkeypatch, ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
    moves = record_module_moves(monkeypatch)
    trained = []

    def train_on_the_cpu(model, train_config, *args, **kwargs):
        """The engine as configured, except on the CPU (torch has no CUDA here)."""
        trained.append((train_config.device, list(moves)))
        return train(model, train_config.model_copy(update={"device": "cpu"}), *args, **kwargs)

    monkeypatch.setattr("tasks.finetune.train", train_on_the_cpu)
    output = run_finetune(
        config.model_copy(update={"max_steps": 2, "device": "cuda:1"}),
        root / "pretrain",
        tokenizer_path,
        corpus,
        tmp_path / "ws",
    )
    # The base loads on the device (and its held-out figures run there) before training does.
    assert trained == [("cuda:1", [torch.device("cuda", 1)])]
    assert "pretrained_completion_loss" in output.metrics and "finetuned_completion_loss" in output.metrics


def test_a_malformed_pairs_file_fails_the_stage_naming_file_and_line(micro_run, tmp_path):
    root, corpus, tokenizer_path, config = micro_run
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    from_file = config.model_copy(update={"task": None, "path": pairs})
    with pytest.raises(UserError, match=f"{pairs}:2: field 'completion' is missing"):
        run_finetune(from_file, root / "pretrain", tokenizer_path, corpus, tmp_path / "ws")
    with pytest.raises(UserError, match="fine-tuning file not found"):
        run_finetune(
            from_file.model_copy(update={"path": tmp_path / "missing.jsonl"}),
            root / "pretrain",
            tokenizer_path,
            corpus,
            tmp_path / "ws",
        )


@torch.no_grad()
def priming_case(tmp_path):
    """(tokenizer, model, train pairs, held-out pairs, config) of the held-out table's priming tests."""
    texts = [module(i) for i in range(3)]
    tokenizer = load_tokenizer(toy_tokenizer(tmp_path / "tokenizer.json", texts, vocab_size=320))
    # Perturbed: a freshly initialised model barely depends on its context, which would hide the examples.
    model = perturbed(tiny_gpt(tokenizer.get_vocab_size(), block_size=64), scale=1.0).eval()
    train = [Pair(f"def f{i}(x):\n", f"    return x + {i}\n") for i in range(5)]
    val = [Pair("def g(x):\n", "    return x\n"), Pair("def h():\n", "    pass\n")]
    config = FinetuneConfig(priming_shots=2, eval_max_new_tokens=6, eval_pairs=2, seed=3, micro_batch_size=2)
    return tokenizer, model, train, val, config


def test_each_primed_row_of_the_held_out_table_scores_in_phases_of_its_own(tmp_path, capsys):
    """Off a terminal, the primed and document-primed rows each show their loss and parse rate
    as phases, each from 0 to its total (its time left covers that phase only)."""
    tokenizer, model, train, val, config = priming_case(tmp_path)
    primed_figures(model, tokenizer, config, PairSet(train=train, val=val), seq_len=64)
    phases = phase_lines(capsys.readouterr().out, "finetune")
    assert list(phases) == [
        "completion loss, primed",
        "parse rate, primed",
        "completion loss, document-primed",
        "parse rate, document-primed",
    ]
    assert all(steps[0][0] == 0 and steps[-1][0] == steps[-1][1] >= 1 for steps in phases.values())


def test_the_primed_row_equals_a_hand_computation(tmp_path):
    """primed_completion_loss: the mean -log p of each held-out completion (and its closing
    <|endoftext|>) after `p1 <|sep|> c1 <|endoftext|> ... query <|sep|>`, with the first
    `priming_shots` train pairs in seeded order that fit beside the query and the body's budget."""
    tokenizer, model, train, val, config = priming_case(tmp_path)
    special = special_ids(tokenizer)
    train.insert(1, Pair("def big():\n", "    y = 1\n" * 40))  # never fits: passed over
    figures = primed_figures(model, tokenizer, config, PairSet(train=train, val=val), seq_len=64)

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    order = list(range(len(train)))
    random.Random(3).shuffle(order)  # the stage's seeded order
    ordered = [train[i] for i in order]
    nats, count, used = 0.0, 0, []
    for pair in val:
        budget = max(len(ids(pair.completion)) + 1, 6)
        prefix, room = [], 64 - budget - len(ids(pair.prompt)) - 1
        chosen = 0
        for example in ordered:
            block = [*ids(example.prompt), special.sep, *ids(example.completion), special.eos]
            if chosen < 2 and len(prefix) + len(block) <= room:
                prefix += block
                chosen += 1
        used.append(chosen)
        tokens = [*prefix, *ids(pair.prompt), special.sep, *ids(pair.completion), special.eos]
        log_probs = torch.log_softmax(model(torch.tensor([tokens]), fp32_logits=True).logits[0], dim=-1)
        first = len(tokens) - len(ids(pair.completion)) - 1  # the first completion token
        for position in range(first, len(tokens)):
            nats -= log_probs[position - 1, tokens[position]].item()
            count += 1
    assert used == [2, 2]
    assert figures["primed_examples"] == 2
    assert figures["primed_completion_loss"] == pytest.approx(nats / count, rel=1e-5)
    assert 0 <= figures["primed_parse_rate"] <= 1
    other_order = primed_figures(model, tokenizer, config.model_copy(update={"seed": 4}), PairSet(train, val), 64)
    assert abs(other_order["primed_completion_loss"] - nats / count) > 1e-3  # the examples matter


def test_the_document_primed_row_equals_a_hand_computation(tmp_path):
    """primed_document_completion_loss: the mean -log p of each held-out completion (and a closing
    <|endoftext|>) after `<|endoftext|> p1 c1 (blank line) p2 c2 (blank line) query`, the text encoded
    whole, the completion's tokens those past the text's (its trailing newline moves to the completion)."""
    tokenizer, model, train, val, config = priming_case(tmp_path)
    eos = special_ids(tokenizer).eos
    figures = primed_figures(model, tokenizer, config, PairSet(train=train, val=val), seq_len=64)

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    order = list(range(len(train)))
    random.Random(3).shuffle(order)
    shown = [train[i] for i in order][:2]
    nats, count = 0.0, 0
    for pair in val:
        text = "".join(f"{e.prompt}{e.completion.rstrip()}\n\n" for e in shown) + pair.prompt
        assert len(ids(text)) + 1 <= 64 - 6  # both examples fit
        context = [eos, *ids(text.rstrip("\n"))]
        completion = ids(text + pair.completion)[len(context) - 1 :] + [eos]
        tokens = context + completion
        log_probs = torch.log_softmax(model(torch.tensor([tokens]), fp32_logits=True).logits[0], dim=-1)
        for position in range(len(context), len(tokens)):
            nats -= log_probs[position - 1, tokens[position]].item()
            count += 1
    assert figures["primed_document_examples"] == 2
    assert figures["primed_document_completion_loss"] == pytest.approx(nats / count, rel=1e-5)
    assert 0 <= figures["primed_document_parse_rate"] <= 1


def test_the_document_row_passes_over_an_example_too_long_for_the_row_as_the_sep_row_does():
    """An example that does not fit beside the query is passed over for the next ones (at most
    `limit`), not the end of the list: the run of 2026-12-06 primed with none at all when the
    first example in the stage's order was too long."""

    def encode(text):  # one token per byte: the document's length is plain arithmetic here
        return list(text.encode())

    special = SpecialIds(eos=0, pad=1, sep=2)
    examples = [("def long():\n", "    x = 1\n" * 20)]
    examples += [(f"def {name}():\n", f"    return {value}\n") for value, name in enumerate("abc", start=1)]
    query = "def q():\n"
    text = "def a():\n    return 1\n\ndef b():\n    return 2\n\n" + query  # the long one left out
    ids, chosen = document_primed_prompt(examples, query, encode, special, room=1 + len(text) + 5, limit=2)
    assert chosen == examples[1:3]
    assert ids == [0, *encode(text)]
    assert document_primed_prompt(examples, query, encode, special, room=1 + len(query), limit=2) == (
        [0, *encode(query)],
        [],
    )


def test_a_completion_longer_than_a_row_is_left_out_of_the_document_row(tmp_path):
    tokenizer, model, train, val, config = priming_case(tmp_path)
    longer = [*val, Pair("def long():\n", "    y = 1\n" * 40)]
    figures = primed_figures(model, tokenizer, config, PairSet(train=train, val=longer), seq_len=64)
    alone = primed_figures(model, tokenizer, config, PairSet(train=train, val=val), seq_len=64)
    assert figures["primed_document_completion_loss"] == pytest.approx(alone["primed_document_completion_loss"])


def test_a_document_primed_body_ends_where_the_function_ends():
    assert function_body("def f(x):\n", "    return x\n\ndef g(y):\n    return") == "    return x\n\n"
    assert function_body("def f(x):\n", "    y = 1\n\n    return y\n") == "    y = 1\n\n    return y\n"
    assert function_body("def f(x):\n", "def g():\n") == ""
    assert function_body("def f(x):", " return x\nprint(1)") == " return x\n"


def replay_shards(root, tokenizer_sha256: str):
    """Train shards (a stream of consecutive ids) that claim the given tokenizer."""
    manifest = make_shards(root, {"train": 12}, vocab_size=320)
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "fingerprint": "replayed", "tokenizer_sha256": tokenizer_sha256}))
    return manifest


def test_the_stage_replays_shards_of_its_tokenizer_and_switches_off_for_others(
    micro_run, tmp_path, monkeypatch, capsys
):
    root, corpus, tokenizer_path, config = micro_run
    config = config.model_copy(update={"replay_fraction": 0.5, "max_steps": 1})
    seen = []

    def first_batch(model, train_config, train_data, *args, **kwargs):
        seen.append(next(iter(train_data)))
        raise KeyboardInterrupt  # enough: the batches are what this test checks

    monkeypatch.setattr("tasks.finetune.train", first_batch)
    ours = replay_shards(tmp_path / "ours", sha256_file(tokenizer_path))
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, root / "pretrain", tokenizer_path, corpus, tmp_path / "ws", shards=ours)
    inputs, targets = seen[-1]
    assert inputs.shape == (4, 64)  # micro_batch_size 4: 2 pair rows and 2 windows of 16 tokens, padded
    assert ((inputs[2:, 1:16] - inputs[2:, :15]) % 320 == 1).all() and (targets[2:, 16:] == IGNORE).all()
    assert not ((inputs[:2, 1:16] - inputs[:2, :15]) % 320 == 1).all()

    theirs = replay_shards(tmp_path / "theirs", "0" * 64)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, root / "pretrain", tokenizer_path, corpus, tmp_path / "ws", shards=theirs)
    assert "replay_fraction 0.5 is off" in capsys.readouterr().err
    assert not any(((row[1:16] - row[:15]) % 320 == 1).all() for row in seen[-1][0])  # pairs only

    # The replayed shards decide the weights: they are in the fingerprint, other shards are not.
    inputs = finetune_inputs("a" * 64, "b" * 64, "c" * 64)
    assert finetune_fingerprint(config, inputs, 64) != finetune_fingerprint(
        config, finetune_inputs("a" * 64, "b" * 64, "c" * 64, "replayed"), 64
    )
    assert FinetuneConfig().replay_fraction > 0
