"""The fine-tuning flow: prepare (or reuse) the config's data, then fine-tune.

`gptflow finetune CONFIG [--from MODEL]` runs it. The start is `--from` (a registered model
or a checkpoint directory), else `finetune.start_from`, else the config's pretraining
output: the pretrain stage runs, or is skipped when its manifest exists, as in the
pipeline. Training holds a slot of the pipeline's `gpu` concurrency limit.
"""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from flows.pipeline import GPU_LIMIT, ensure_gpu_limit, holding, flow_run_title, pipeline_mlflow_run
from flows.preflight import check_run
from flows.prepare import check_prepare_config, prepare_data
from model.errors import UserError
from tasks import tracking
from tasks.finetune import FinetuneOutput, finetune_task
from tasks.pretrain import pretrain_task


@flow(name="finetune", flow_run_name=flow_run_title)
def finetune_flow(config: PipelineConfig, start_from: str | None = None) -> FinetuneOutput:
    """Fine-tune on the config's pairs, starting from `start_from` or the pretraining output."""
    if config.finetune is None:
        raise UserError("finetune: the config's finetune section is null; give it settings to fine-tune")
    tracking.check_tracking_server()
    check_prepare_config(config)
    base = start_from or config.finetune.start_from
    check_run(config, training=("finetune",) if base else ("pretrain", "finetune"), finetune_from=base)
    ensure_gpu_limit()
    with pipeline_mlflow_run(config) as run_id:
        prepared = prepare_data(config, parent_run_id=run_id)
        with holding(GPU_LIMIT):
            if base is None:
                pretrained = pretrain_task(config.pretrain, config.model, prepared.shards, config.workspace,
                                           parent_run_id=run_id)
                base = pretrained.checkpoint
            return finetune_task(
                config.finetune, base, prepared.tokenizer.tokenizer, prepared.corpus.corpus, config.workspace,
                parent_run_id=run_id,
            )
