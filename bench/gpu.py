"""GPU training speed, and everything around it, in one run on a single GPU with no network.

On a lent GPU machine (no registry; pydantic travels as wheels), in one call of at most 7 minutes:

    bash bench/gpu_machine.sh fetch              # here, once: pydantic's wheels into bench/wheels/
    bash bench/gpu_machine.sh run                # there: install them, run the default phases
    bash bench/gpu_machine.sh run --phases sparse no_padding no_chunked_loss no_compile   # a 2nd call

(for the device tool: command `bash bench/gpu_machine.sh run`, carry ["bench/wheels"],
timeout_s 450; the JSON lines land in $OUT/bench-gpu.jsonl.) Or directly, where pydantic is
installed:

    python bench/gpu.py [--out bench-gpu.jsonl] [--phases ...] [--budget-scale 1]
    python bench/gpu.py --device cpu --smoke     # micro shapes: checks the script (CI runs it)

It needs only model/, the standard library, torch (2.11 or newer), numpy, pyarrow, safetensors
and pydantic; it writes its random shards itself. It first prints the device, torch and CUDA
versions. Each phase runs in a child process of its own with its own time budget (seconds,
sized for a fresh H100 including the phase's first torch.compile; --budget-scale scales them
all) and its own error handling: a phase that fails, runs out of memory or out of time records
that and the next one starts on a fresh device. Each phase appends one JSON line to --out as
it finishes, so a run cut short keeps what it measured. Phases, most important first; the
default run (about 6 minutes) is the first group:

    env          torch, CUDA, the device, the bf16 datasheet peak MFU is measured against
    train        gpt2-small at configs/gpt2-small.yaml's shape: micro-batches of 64 x 1024,
                 accumulated to 2^19 tokens a step, compiled, bf16: tokens/s, MFU by gptflow's
                 count (6N + 12·L·T·d) and by llm.c's (6N + 6·L·C·T, N with the padded vocabulary
                 and the position embeddings), first-step (compile) time, peak memory, checkpoint time,
                 host syncs per step (counted by CUDA's sync debug mode)
    train_small  the same at 16 x 1024 in one micro-batch a step (the plain step's shape)
    plain        a compiled bf16 GPT-2 step written as nanoGPT's train.py runs it, at 16 x 1024
    generate     cached generation tokens/s at batch 1 and 8; cached logits = uncached (fp32)
    evaluate     evaluation (forward + loss) tokens/s on the shards
    loader       WindowLoader tokens/s on the shards

    sparse       (alone) gpt3-small at seq 2048, dense and banded sparse layers: tokens/s,
                 graph breaks and recompiles, flex attention's logits against masked SDPA's;
                 and the same model with every layer dense, for the ratio
    no_padding, no_chunked_loss, no_compile    (alone) train_small with one speed choice off

Then it prints the pass criteria and whether each held: one host sync per step and MFU >= 40%
at the config's shape, the engine >= 1.0x the plain step at 16 x 1024, no graph break or
recompile and flex = SDPA (sparse), cached logits = uncached (generate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import loader_tokens_per_s, random_shards  # noqa: E402
from plain_step import plain_training_steps  # noqa: E402
from train import RandomTokens, timing_run  # noqa: E402

from model.config import GPTConfig, preset  # noqa: E402
from model.data import WindowLoader  # noqa: E402
from model.device import device_model, has_bf16  # noqa: E402
from model.generate import generate  # noqa: E402
from model.gpt import GPT, AttentionMask, KVCache  # noqa: E402
from model.mfu import llmc_flops_per_token, measure_matmul_flops, peak_flops  # noqa: E402
from model.scoring import score_batches  # noqa: E402
from model.train import train  # noqa: E402

# Seconds per phase on a fresh H100, first compile included (measured on CPU only so far:
# compile 40-70 s for gpt2-small per the issue; each train-like phase is one compile plus
# ~15 s of steps and a checkpoint). The default phases sum to 380 s: with pip and Python's
# start-up the call stays under 7 minutes. The rest is run alone.
DEFAULT_BUDGETS = {
    "env": 25,
    "train": 120,
    "train_small": 75,
    "plain": 75,
    "generate": 40,
    "evaluate": 30,
    "loader": 15,
}
ALONE_BUDGETS = {"sparse": 180, "no_padding": 75, "no_chunked_loss": 90, "no_compile": 45}
BUDGETS = DEFAULT_BUDGETS | ALONE_BUDGETS
SPEED_CHOICES_OFF = {"no_padding": {"vocab_multiple": 1}, "no_chunked_loss": {"loss_chunk": 0}, "no_compile": {}}


class Shapes:
    """What the phases run: gpt2-small / gpt3-small on the GPU, micro models with --smoke."""

    def __init__(self, smoke: bool):
        micro = {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 1000}  # 1,000: not a multiple of 128
        self.gpt2 = preset("gpt2-small").model_copy(update={**micro, "block_size": 128} if smoke else {})
        self.gpt3 = preset("gpt3-small").model_copy(
            update={**micro, "block_size": 256, "sparse_window": 64} if smoke else {}
        )
        # (micro-batch, seq, micro-batches a step): configs/gpt2-small.yaml's, and one micro-batch of 16
        self.config_shape = (4, 128, 2) if smoke else (64, 1024, 8)
        self.small_shape = (4, 128, 1) if smoke else (16, 1024, 1)
        self.sparse_batch, self.sparse_seq = (2, 256) if smoke else (8, 2048)
        self.warmup, self.steps = (1, 2) if smoke else (2, 8)
        self.config_steps = 2 if smoke else 4  # 2^19 tokens a step: about a second each on an H100
        self.prompt, self.new_tokens = (16, 16) if smoke else (128, 256)
        self.windows = 200 if smoke else 20_000


def engine_run(
    config: GPTConfig,
    shape: tuple[int, int, int],
    steps: int,
    shapes: Shapes,
    device: str,
    compile: bool | None,
    out_dir: Path,
) -> dict[str, Any]:
    """One engine run (model.train.train) at `shape` (micro-batch, seq, micro-batches a step):
    step times, MFU by both counts, and the final checkpoint's time."""
    batch, seq, accumulation = shape
    torch.manual_seed(0)
    model = GPT(config)
    settings = timing_run(shapes.warmup + steps, batch, seq, device, compile).model_copy(
        update={"batch_tokens": batch * seq * accumulation}
    )
    seen: list[tuple[float, dict[str, float]]] = []  # (time of the callback, metrics)
    syncs: list[int] = []  # host syncs CUDA had warned of by each step's callback
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        if device == "cuda":  # warns at every synchronizing CUDA call: the engine should make one a step
            torch.cuda.set_sync_debug_mode("warn")

        def record(step: int, metrics: dict[str, float]) -> None:
            seen.append((time.perf_counter(), dict(metrics)))
            syncs.append(sum("synchronizing" in str(warning.message) for warning in warned))

        result = train(model, settings, RandomTokens(batch, seq, config.vocab_size), None, out_dir, callback=record)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    timed = [metrics for _, metrics in seen[shapes.warmup :]]
    rates = [metrics["tokens_per_s"] for metrics in timed]
    tokens_per_s = statistics.median(rates)
    peak = result.runtime.peak_flops
    last_step_s = settings.batch_tokens / seen[-1][1]["tokens_per_s"]
    return {
        "shape": f"{batch} x {seq} x {accumulation} micro-batches = {settings.batch_tokens} tokens a step",
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_range": [min(rates), max(rates)],
        "mfu": config.flops_per_token(seq) * tokens_per_s / peak if peak else None,
        "mfu_llmc": llmc_flops_per_token(config, seq) * tokens_per_s / peak if peak else None,
        "peak_flops": peak,
        "peak_source": result.runtime.peak_source,
        "precision": result.runtime.precision,
        "first_step_s": settings.batch_tokens / seen[0][1]["tokens_per_s"],  # compilation, mostly
        "peak_memory_mb": seen[-1][1]["memory_mb"],
        # The final checkpoint is written between the last step's timing and its callback.
        "checkpoint_s": seen[-1][0] - seen[-2][0] - last_step_s,
        "loss_first_last": [seen[0][1]["loss"], seen[-1][1]["loss"]],
        # Between two timed steps' callbacks (the last step also checkpoints); 0 where nothing warns (CPU).
        "host_syncs_per_step": statistics.median(
            after - before for before, after in zip(syncs[shapes.warmup - 1 : -2], syncs[shapes.warmup : -1])
        ),
    }


def phase_env(shapes: Shapes, device: torch.device, scratch: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        peak = peak_flops(device, bf16=True)
        result |= {
            "name": device_model(device),
            "bf16_peak_flops": peak.flops,
            "peak_source": peak.source,
            "memory_gb": torch.cuda.get_device_properties(device).total_memory / 2**30,
        }
    result["measured_fp32_matmul_flops"] = measure_matmul_flops(size=512 if shapes.steps < 3 else 4096, device=device)
    return result


def phase_train(
    shapes: Shapes,
    device: torch.device,
    scratch: Path,
    changes: dict[str, Any] | None = None,
    compile: bool | None = None,
    small: bool = False,
) -> dict[str, Any]:
    config = shapes.gpt2.model_copy(update=changes or {})
    shape, steps = (shapes.small_shape, shapes.steps) if small else (shapes.config_shape, shapes.config_steps)
    return engine_run(config, shape, steps, shapes, device.type, compile, scratch) | {
        "config": {"vocab_multiple": config.vocab_multiple, "loss_chunk": config.loss_chunk, "compile": compile},
    }


def phase_plain(shapes: Shapes, device: torch.device, scratch: Path) -> dict[str, Any]:
    cuda = device.type == "cuda"
    batch, seq, _ = shapes.small_shape
    started = time.perf_counter()
    steps = plain_training_steps(shapes.gpt2, batch, seq, device, bf16=cuda, compile=cuda)
    rates = list(islice(steps, shapes.warmup + shapes.steps))[shapes.warmup :]
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_range": [min(rates), max(rates)],
        "seconds": time.perf_counter() - started,
        "compiled_bf16": cuda,
    }


def phase_sparse(shapes: Shapes, device: torch.device, scratch: Path) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    shape = (shapes.sparse_batch, shapes.sparse_seq, 1)
    counters.clear()
    run = engine_run(shapes.gpt3, shape, shapes.steps, shapes, device.type, None, scratch / "sparse")
    result = run | {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],  # 1 compiled forward: no recompiles
    }
    dense = shapes.gpt3.model_copy(update={"attention": ["dense"]})
    result["dense_tokens_per_s"] = engine_run(dense, shape, shapes.steps, shapes, device.type, None, scratch)[
        "tokens_per_s"
    ]
    # Flex attention's band (the BlockMask path, CUDA) against the same band as a boolean mask for SDPA.
    torch.manual_seed(0)
    model = GPT(shapes.gpt3).to(device).eval()
    tokens = torch.randint(shapes.gpt3.vocab_size, (1, shapes.sparse_seq), device=device)
    with torch.no_grad():
        flex = model(tokens).logits
        masks = {
            kind: AttentionMask(model._mask_tensor(shapes.sparse_seq, 0, kind, None, device), False)
            for kind in ("dense", "sparse")
        }
        model._attention_masks = lambda *args: masks  # every layer through SDPA with a mask tensor
        sdpa = model(tokens).logits
    result["flex_vs_sdpa_max_abs_diff"] = (flex - sdpa).abs().max().item()
    result["flex_used"] = device.type == "cuda"
    return result


def cached_vs_uncached_logits(model: GPT, prompt: torch.Tensor, new_tokens: int) -> float:
    """Max |difference| between the logits of a cached decode (the prompt, then one token at a
    time) and one uncached forward over the same tokens, in fp32 without TF32: what the
    cache changes, not what bf16 rounding of different matmul shapes does."""
    tokens = torch.cat([prompt, torch.randint_like(prompt[:, :1], model.config.vocab_size).repeat(1, new_tokens)], 1)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            cache = KVCache(model.config, tokens.size(0), device=tokens.device)
            cached = [model(prompt, cache=cache).logits]
            for position in range(prompt.size(1), tokens.size(1)):
                cached.append(model(tokens[:, position : position + 1], cache=cache).logits)
            uncached = model(tokens).logits
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return (torch.cat(cached, 1) - uncached).abs().max().item()


def phase_generate(shapes: Shapes, device: torch.device, scratch: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT(shapes.gpt2).to(device).eval()
    result: dict[str, Any] = {}
    for batch in (1, 8):
        prompts = torch.randint(shapes.gpt2.vocab_size, (batch, shapes.prompt)).tolist()
        generate(model, prompts, 4, temperature=0)  # warm-up: kernels, allocator
        started = time.perf_counter()
        generate(model, prompts, shapes.new_tokens, temperature=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result[f"cached_tokens_per_s_batch{batch}"] = batch * shapes.new_tokens / (time.perf_counter() - started)
    prompt = torch.randint(shapes.gpt2.vocab_size, (2, shapes.prompt), device=device)
    result["cached_vs_uncached_logits_max_abs_diff"] = cached_vs_uncached_logits(model, prompt, shapes.new_tokens // 4)
    return result


def phase_loader(shapes: Shapes, device: torch.device, scratch: Path) -> dict[str, Any]:
    manifest = random_shards(scratch, windows=shapes.windows)
    rates = loader_tokens_per_s(manifest, runs=3)
    return {"tokens_per_s": statistics.median(rates), "tokens_per_s_range": [min(rates), max(rates)]}


def phase_evaluate(shapes: Shapes, device: torch.device, scratch: Path) -> dict[str, Any]:
    """Forward passes and the loss over windows of the loader's random shards (seq 256, vocab 8,192)."""
    manifest = random_shards(scratch, windows=shapes.windows // 4)
    config = shapes.gpt2.model_copy(update={"vocab_size": 8192, "block_size": max(256, shapes.gpt2.block_size)})
    torch.manual_seed(0)
    model = GPT(config).to(device)
    byte_lengths = torch.ones(config.vocab_size, dtype=torch.long)
    loader = WindowLoader(manifest, "train", 16, shuffle=False)
    batches = list(islice(loader, loader.num_windows // 16))  # one epoch (the loader never ends)
    score_batches(model, batches[:2], byte_lengths, device)  # warm-up
    started = time.perf_counter()
    totals = score_batches(model, batches, byte_lengths, device)  # bf16 matmuls where the GPU has them
    return {"tokens_per_s": totals.tokens / (time.perf_counter() - started), "bf16": has_bf16(device)}


PHASES = {
    "env": phase_env,
    "train": phase_train,
    "plain": phase_plain,
    "sparse": phase_sparse,
    "generate": phase_generate,
    "loader": phase_loader,
    "evaluate": phase_evaluate,
}


def run_phase(name: str, device: str, smoke: bool) -> None:
    """In the child process: run one phase and print its result as the last line of stdout."""
    torch.backends.cuda.matmul.allow_tf32 = True
    with tempfile.TemporaryDirectory() as scratch:
        shapes, where = Shapes(smoke), torch.device(device)
        if name == "train_small":
            result = phase_train(shapes, where, Path(scratch), small=True)
        elif name in SPEED_CHOICES_OFF:
            compile = False if name == "no_compile" else None
            result = phase_train(shapes, where, Path(scratch), SPEED_CHOICES_OFF[name], compile, small=True)
        else:
            result = PHASES[name](shapes, where, Path(scratch))
    print(json.dumps(result))


def criteria(results: dict[str, dict[str, Any]], smoke: bool) -> list[tuple[str, bool | None]]:
    """(criterion, held) for each pass criterion; None where its phase has no figure, and for the
    speed targets at --smoke's micro shapes, where they mean nothing."""

    def get(phase: str, key: str) -> Any:
        return results.get(phase, {}).get(key)

    mfu, engine, plain = get("train", "mfu"), get("train_small", "tokens_per_s"), get("plain", "tokens_per_s")
    breaks, graphs, diff = (
        get("sparse", "graph_breaks"),
        get("sparse", "unique_graphs"),
        get("sparse", "flex_vs_sdpa_max_abs_diff"),
    )
    logits = get("generate", "cached_vs_uncached_logits_max_abs_diff")
    syncs = get("train", "host_syncs_per_step")
    return [
        ("one host sync per training step (CUDA's sync debug mode)", None if syncs is None or smoke else syncs == 1),
        ("gpt2-small MFU >= 40% of the bf16 peak at 64 x 1024 x 8", None if mfu is None or smoke else mfu >= 0.40),
        (
            "engine >= 1.0x the plain compiled bf16 step at 16 x 1024",
            None if engine is None or plain is None or smoke else engine >= plain,
        ),
        ("gpt3-small sparse: no graph breaks", None if breaks is None else breaks == 0),
        ("gpt3-small sparse: no recompiles (at most 1 graph)", None if graphs is None else graphs <= 1),
        ("flex attention logits = masked SDPA's (max abs diff < 2e-2)", None if diff is None else diff < 2e-2),
        ("cached logits = uncached, fp32 (max abs diff < 1e-3)", None if logits is None else logits < 1e-3),
    ]


def describe_machine(device: str) -> str:
    """The line that keeps figures of different machines apart: device name, torch, CUDA."""
    where = torch.device(device)
    name = device_model(where) if where.type != "cuda" or torch.cuda.is_available() else "no CUDA device visible"
    return f"device {device} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="micro shapes, a few steps: checks that every phase runs")
    parser.add_argument("--out", type=Path, default=Path("bench-gpu.jsonl"), help="JSON lines, appended per phase")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every phase's time budget")
    parser.add_argument("--phases", nargs="+", default=list(DEFAULT_BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--phase", choices=list(BUDGETS), help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args()
    if args.phase:
        run_phase(args.phase, args.device, args.smoke)
        return

    print(describe_machine(args.device), flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name in args.phases:
        budget = BUDGETS[name] * args.budget_scale
        command = [sys.executable, __file__, "--phase", name, "--device", args.device] + ["--smoke"] * args.smoke
        started = time.perf_counter()
        record: dict[str, Any] = {"phase": name, "budget_s": round(budget, 1)}
        try:
            child = subprocess.run(command, capture_output=True, text=True, timeout=budget, check=False)
            if child.returncode == 0:
                record |= {"ok": True, **json.loads(child.stdout.strip().splitlines()[-1])}
            else:
                record |= {"ok": False, "error": (child.stderr.strip().splitlines() or ["no output"])[-1]}
        except subprocess.TimeoutExpired:
            record |= {"ok": False, "error": f"timed out after {budget:.0f} s"}
        record["seconds"] = round(time.perf_counter() - started, 1)
        results[name] = record
        with args.out.open("a") as out:
            out.write(json.dumps(record) + "\n")
        print(
            f"{name}: "
            + ", ".join(
                f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                for key, value in record.items()
                if key != "phase"
            ),
            flush=True,
        )

    print("pass criteria:")
    for criterion, held in criteria(results, args.smoke):
        print(f"  {'PASS' if held else 'n/a ' if held is None else 'FAIL'}  {criterion}")


if __name__ == "__main__":
    main()
