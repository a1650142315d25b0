"""The `gptflow` commands: each command's typed signature is its interface, its body a call
into the flows, the servers (ops) or the stages and a few lines of output. The table that
names them is `cli/app.py`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from model.errors import UserError

if TYPE_CHECKING:  # imported by the commands that need it: the command line starts fast
    from flows.pipeline_config import PipelineConfig
    from tasks.models.sources import SourceModel

ConfigArg = Annotated[Path, typer.Argument(help="YAML config, e.g. configs/tiny.yaml")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config field: dotted.key=value (repeatable)."),
]


def load_for_flows(config: Path, overrides: list[str] | None) -> PipelineConfig:
    """The config of a command that runs flows, once the Prefect server they go to answers
    (when it is `gptflow up`'s: see `ops.servers.check_prefect_server`)."""
    from flows.pipeline_config import load_config
    from ops.servers import check_prefect_server

    settings = load_config(config, overrides or [])
    check_prefect_server(settings.tracking_attempts)
    return settings


def prepare(config: ConfigArg, overrides: SetOpt = None) -> None:
    """Prepare the data: ingest the corpus, train the tokenizer, write the shards."""
    from flows.prepare import check_prepare_config, prepare_data

    settings = load_for_flows(config, overrides)
    check_prepare_config(settings)
    print(prepare_data(settings).summary())


def pretrain(config: ConfigArg, overrides: SetOpt = None) -> None:
    """Prepare the data, then pretrain (resuming from the newest checkpoint of an unfinished run)."""
    from flows.pretrain_flow import pretrain as pretrain_flow

    output = pretrain_flow(load_for_flows(config, overrides))
    for name, value in output.metrics.items():
        print(f"{name:<16} {value:.4f}")
    print(f"checkpoint  {output.checkpoint}{' (reused)' if output.reused else ''}")


ModelArg = Annotated[str, typer.Argument(help="A checkpoint directory, or models:/NAME@ALIAS or models:/NAME/VERSION.")]


def evaluate(config: ConfigArg, model: ModelArg, overrides: SetOpt = None) -> None:
    """Evaluate a model on the config's data: loss, perplexity, bits per byte, accuracy, samples."""
    from flows.evaluate_flow import evaluate_flow
    from tasks.models.sources import find_checkpoint, is_registry_uri

    settings = load_for_flows(config, overrides)
    if not is_registry_uri(model):
        find_checkpoint(Path(model))  # a wrong path fails now, before any data is prepared
    output = evaluate_flow(settings, model)
    for name, value in output.metrics.items():
        print(f"{name:<20} {value:.4f}")
    print(f"samples  {output.samples}")


def finetune(
    config: ConfigArg,
    start_from: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="A registered model (models:/NAME@ALIAS) or checkpoint directory to start from; "
            "default: the config's pretraining output.",
        ),
    ] = None,
    overrides: SetOpt = None,
) -> None:
    """Fine-tune on prompt/completion pairs (default task: docstring -> function)."""
    from flows.finetune_flow import finetune_flow
    from tasks.models.sources import find_checkpoint, is_registry_uri

    settings = load_for_flows(config, overrides)
    if start_from and not is_registry_uri(start_from):
        find_checkpoint(Path(start_from))
    output = finetune_flow(settings, start_from)
    for name, value in output.metrics.items():
        print(f"{name:<34} {value:.4f}")
    print(f"checkpoint  {output.checkpoint}")


def run(
    config: ConfigArg,
    overrides: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved config and which stages would run or skip.")
    ] = False,
) -> None:
    """Run the whole pipeline: data, pretraining, evaluation, fine-tuning, registration."""
    from flows.pipeline_config import load_config

    settings = load_config(config, overrides or [])
    if dry_run:
        from flows.plan import describe_plan

        print(describe_plan(settings))
        return
    from flows.pipeline import pipeline
    from ops.servers import check_prefect_server

    check_prefect_server(settings.tracking_attempts)

    result = pipeline(settings)
    for name, value in result.metrics.items():
        print(f"{name:<24} {value:.4f}")
    registered = result.registered
    print(f"registered  {registered.model_uri} (@candidate); champion: version {registered.champion_version}")
    print(f"gate        {registered.decision}")
    print(f"mlflow run  {result.mlflow_run_link}")


GenerateModelArg = Annotated[
    str,
    typer.Argument(
        help="A checkpoint or stage directory, a Hugging Face GPT-2 directory or hub name, "
        "models:/NAME@ALIAS, models:/NAME/3 or runs:/ID/model."
    ),
]
PromptOpt = Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")]
PromptFileOpt = Annotated[Path | None, typer.Option(help="A file whose whole text is one prompt.")]
ExamplesOpt = Annotated[
    Path | None, typer.Option(help="Prime with these examples: JSON Lines of {prompt, completion}.")
]
ShotsOpt = Annotated[int | None, typer.Option(help="Prime with the first K fine-tuning pairs of --config that fit.")]
ShotsConfigOpt = Annotated[Path | None, typer.Option(help="With --shots: the YAML config whose pairs prime.")]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="auto (the model's own; examples as pairs), document (examples too: plain text, blank lines "
        "between), or pair (`prompt <|sep|>`).",
    ),
]
StreamOpt = Annotated[bool, typer.Option(help="Print tokens as they are drawn.")]
TopKOpt = Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 keeps all.")]
SeedOpt = Annotated[int, typer.Option(help="Repeatable samples; -1 draws fresh ones.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (the first GPU, else the CPU), cpu, cuda or cuda:N.")]


def generate(
    model: GenerateModelArg,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    examples: ExamplesOpt = None,
    shots: ShotsOpt = None,
    config: ShotsConfigOpt = None,
    prompt_format: FormatOpt = "auto",
    stream: StreamOpt = False,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: TopKOpt = 40,
    top_p: float = 1.0,
    seed: SeedOpt = -1,
    device: DeviceOpt = "auto",
) -> None:
    """Print a completion for each prompt; stops at end of text. A model gptflow fine-tuned is
    prompted in its fine-tuning format (`prompt <|sep|>`); text like <|sep|> in a prompt is plain text."""
    from tasks.models.completions import Sampling

    if prompt_format not in ("auto", "document", "pair"):
        raise UserError(f"--format: {prompt_format!r} is not one of auto, document, pair")
    texts = prompt_texts(prompt, prompt_file)
    primers, source_name = priming_examples(examples, shots, config)
    source = model_on_device(model, device)
    sampling = Sampling(max_new_tokens, temperature, top_k or None, top_p, None if seed < 0 else seed)
    layout = None if prompt_format == "auto" else prompt_format
    settings = dict(sampling=sampling, examples=primers, prompt_format=layout, examples_source=source_name, shots=shots)
    print_completions(source, texts, stream, settings)


def model_on_device(model: str, device: str) -> SourceModel:
    """The model `model` names, on `device` (a device this machine lacks fails before the model loads)."""
    from model.device import resolve_device
    from tasks.models.sources import open_model

    where = resolve_device(device, field="--device")
    source = open_model(model)
    source.model.to(where)
    return source


def prompt_texts(prompt: list[str] | None, prompt_file: Path | None) -> list[str]:
    """The prompts of --prompt (repeatable) and --prompt-file."""
    texts = list(prompt or [])
    if prompt_file is not None:
        texts.append(read_text_file(prompt_file, "--prompt-file"))
    if not texts:
        raise UserError("generate: give a prompt (--prompt TEXT, repeatable, or --prompt-file FILE)")
    return texts


def priming_examples(
    examples: Path | None, shots: int | None, config: Path | None
) -> tuple[list[tuple[str, str]] | None, str]:
    """The examples that prime each prompt (from --examples, or --shots K of --config's
    pairs), and where they come from."""
    from model.prompts import parse_examples

    if examples is not None and shots is not None:
        raise UserError("generate: give --examples FILE or --shots K --config CONFIG, not both")
    if (shots is None) != (config is None):
        raise UserError("generate: --shots K and --config CONFIG go together")
    if examples is not None:
        return parse_examples(read_text_file(examples, "--examples"), str(examples)), str(examples)
    if shots is not None:
        from flows.finetune_flow import priming_pairs  # imports Prefect: only --shots needs it

        return priming_pairs(config), f"{config} (finetune pairs)"
    return None, str(examples)


def print_completions(source: SourceModel, texts: list[str], stream: bool, settings: dict) -> None:
    """Each prompt with its completion; streamed, one prompt at a time, as tokens are drawn."""
    from tasks.models.completions import complete

    max_new_tokens, shots = settings["sampling"].max_new_tokens, settings["shots"]
    batches = [[text] for text in texts] if stream else [texts]
    for batch in batches:
        if stream:
            print(batch[0], end="", flush=True)
        on_text = (lambda row, piece: print(piece, end="", flush=True)) if stream else None
        for completion in complete(source, batch, on_text=on_text, **settings):
            if completion.dropped_tokens:
                print(
                    f"generate: the prompt was cut to its last {source.model.config.block_size - max_new_tokens} "
                    f"tokens (dropped {completion.dropped_tokens}) to leave room for {max_new_tokens} new ones",
                    file=sys.stderr,
                )
            if completion.examples_used and shots is not None:
                print(f"generate: primed with {completion.examples_used} of {shots} examples", file=sys.stderr)
            print("" if stream else f"{completion.prompt}{completion.text}")
            print("-" * 40)


def print_config(config: ConfigArg, overrides: SetOpt = None) -> None:
    """Print the resolved config as YAML: every key with its type, default and description above it."""
    from cli.config_listing import config_yaml
    from flows.pipeline_config import load_config

    print(config_yaml(load_config(config, overrides or [])), end="")


def read_text_file(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{option}: cannot read {path} ({e})") from None


def export(
    model: Annotated[str, typer.Argument(help="A checkpoint or stage directory, or models:/NAME@ALIAS.")],
    out_dir: Annotated[Path, typer.Argument(help="The Hugging Face model directory to write.")],
    force: Annotated[bool, typer.Option(help="Replace the files of a non-empty OUT_DIR.")] = False,
    push_to_hub: Annotated[
        str | None, typer.Option(help="Also upload the directory to this Hugging Face hub repository.")
    ] = None,
) -> None:
    """Write MODEL as a directory AutoModelForCausalLM and AutoTokenizer load, with a model card."""
    from tasks.models.hf_export import export_model, push_directory, require_hf_extra
    from tasks.models.sources import open_model

    require_hf_extra()  # before a registered model is downloaded for nothing
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise UserError(f"{out_dir}: exists and is not empty; pass --force to replace its files")
    written = export_model(open_model(model), out_dir)
    print(f"exported  {written}")
    if push_to_hub:
        print(f"pushed    {push_directory(written, push_to_hub)}")


def serve(
    config: ConfigArg,
    cron: Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 3 * * *" (03:00 every day).')] = None,
    interval: Annotated[int | None, typer.Option(help="Or: run every this many seconds.")] = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    overrides: SetOpt = None,
) -> None:
    """Serve the pipeline as a scheduled deployment from this process (no worker needed)."""
    from flows.pipeline import pipeline

    if (cron is None) == (interval is None):
        raise UserError("serve: give exactly one of --cron and --interval")
    load_for_flows(config, overrides)  # a broken config fails now, not at 03:00
    pipeline.serve(
        name=name,
        cron=cron,
        interval=interval,
        parameters={"config": str(config.resolve()), "overrides": overrides or []},
        description=f"gptflow pipeline on {config}",
    )


def runs(
    config: Annotated[Path | None, typer.Argument(help="YAML config: its name is the MLflow experiment")] = None,
    compare: Annotated[
        tuple[str, str] | None, typer.Option(help="Two runs (name or id) side by side: differing settings, figures")
    ] = None,
    experiment: Annotated[str | None, typer.Option(help="The MLflow experiment, instead of a config's name")] = None,
) -> None:
    """List the pipeline runs: start, status, the settings that differ, headline figures, version and aliases."""
    from rich.console import Console

    from flows.pipeline_config import load_config
    from tasks.tracking.compare import compare_table, runs_table

    if (config is None) == (experiment is None):
        raise UserError("gptflow runs: give a CONFIG or --experiment NAME (one of them)")
    name = experiment or load_config(config).name
    # Off a terminal (a pipe, a file) rich would fit the table into 80 columns; a wide table reads better.
    console = Console() if sys.stdout.isatty() else Console(width=250)
    console.print(compare_table(name, *compare) if compare else runs_table(name))


def status(
    workspace: Annotated[str, typer.Argument(help="The workspace: a directory or s3://bucket/prefix.")] = "workspace",
) -> None:
    """List the workspace's stage outputs: stage, fingerprint, size, complete or not."""
    from flows.housekeeping import format_size, stage_outputs

    outputs = stage_outputs(workspace)
    if not outputs:
        print(f"{workspace}: no stage outputs")
    for output in outputs:
        state = "complete" if output.complete else "incomplete"
        print(f"{output.stage:<9} {output.fingerprint:<18} {format_size(output.size):>9}  {state}")


def clean(
    workspace: Annotated[str, typer.Argument(help="The workspace: a directory or s3://bucket/prefix.")] = "workspace",
    keep: Annotated[
        list[Path] | None,
        typer.Option(
            "--keep",
            help="A config whose stage outputs (and their inputs) are kept; repeatable. "
            "Without --keep only incomplete outputs are removed.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
) -> None:
    """Remove incomplete stage outputs, and complete ones no --keep config refers to."""
    from flows.housekeeping import format_size, removable, remove
    from flows.pipeline_config import load_config

    configs = [load_config(path) for path in keep or []]
    doomed = removable(workspace, configs)
    for output in doomed:
        reason = "incomplete" if not output.complete else "unreferenced"
        print(f"{'would remove' if dry_run else 'removing'} {output.location} ({reason}, {format_size(output.size)})")
    if not dry_run:
        remove(doomed)
    print(
        f"{len(doomed)} stage output(s), {format_size(sum(o.size for o in doomed))}"
        + (" (dry run)" if dry_run else " removed")
    )


def up(
    prefect_port: Annotated[int, typer.Option(help="Port of the Prefect server and UI.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow server and UI.")] = 5000,
    data_dir: Annotated[Path, typer.Option(help="Where MLflow keeps mlflow.db and mlartifacts/.")] = Path("."),
) -> None:
    """Start a local Prefect server and MLflow server; `gptflow run` then uses them."""
    from ops import servers

    records = servers.up(prefect_port=prefect_port, mlflow_port=mlflow_port, data_dir=data_dir)
    print(f"Prefect UI: {records['prefect'].ui_url}  (API {records['prefect'].api_url})")
    print(f"MLflow UI:  {records['mlflow'].ui_url}")
    print("Stop both with `gptflow down`.")


def down() -> None:
    """Stop the servers `gptflow up` started."""
    from ops import servers

    stopped = servers.down()
    print(f"stopped: {', '.join(stopped)}" if stopped else "no servers were running")
