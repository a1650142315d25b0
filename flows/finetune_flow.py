"""The fine-tuning flow: prepare (or reuse) the config's data, then fine-tune.

`gptflow finetune CONFIG [--from MODEL]` runs it. The start is `--from` (a registered model
or a checkpoint directory), else `finetune.start_from`, else the config's pretraining
output: the pretrain stage runs, or is skipped when its manifest exists, as in the
pipeline. Training holds slots of the `gpu` concurrency limit, as in the pipeline.
"""

from __future__ import annotations

from prefect import flow

from flows.pipeline_config import PipelineConfig
from flows.prepare import prepare_data
from flows.run.context import flow_run_title, flow_runtime
from flows.run.training import finetuned, pretrained
from model.errors import UserError
from tasks.finetune import FinetuneOutput


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
