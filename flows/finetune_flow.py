"""The fine-tuning flow: prepare (or reuse) the config's data, then fine-tune.

`gptflow finetune CONFIG [--from MODEL]` runs it. The start is `--from` (a registered model
or a checkpoint directory), else `finetune.start_from`, else the config's pretraining
output: the pretrain stage runs, or is skipped when its manifest exists, as in the
pipeline. Training holds slots of the `gpu` concurrency limit, as in the pipeline.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.pipeline_config import PipelineConfig, load_config
from flows.prepare import prepare_data
from flows.run.context import flow_run_title, flow_runtime
from flows.run.training import finetuned, pretrained
from model.errors import UserError
from tasks.finetune import FinetuneOutput, load_pairs
from tasks.finetune_priming import priming_order
from tasks.ingest import run_ingest


@flow(name="finetune", flow_run_name=flow_run_title)
def finetune_flow(config: PipelineConfig, start_from: str | None = None) -> FinetuneOutput:
    """Fine-tune on the config's pairs, starting from `start_from` or the pretraining output."""
    if config.finetune is None:
        raise UserError("finetune: the config's finetune section is null; give it settings to fine-tune")
    base = start_from or config.finetune.start_from
    training = ("finetune",) if base else ("pretrain", "finetune")
    with flow_runtime(config, training, finetune_from=base) as run_id:
        prepared = prepare_data(config, parent_run_id=run_id)
        if base is None:
            base = pretrained(config, prepared, run_id).checkpoint
        return finetuned(config, base, prepared, run_id)


def priming_pairs(config: Path) -> list[tuple[str, str]]:
    """The config's fine-tuning train pairs in the stage's seeded order, as `gptflow generate
    --shots K --config CONFIG` primes with them (its corpus is ingested, or reused)."""
    settings = load_config(config)
    if settings.finetune is None:
        raise UserError(f"{config}: has no finetune section, so no pairs to prime with")
    corpus = run_ingest(settings.ingest, settings.workspace)
    pairs = priming_order(load_pairs(settings.finetune, corpus.corpus).train, settings.finetune.seed)
    return [(pair.prompt, pair.completion) for pair in pairs]
