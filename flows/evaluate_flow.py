"""The evaluation flow: prepare (or reuse) the config's data, then evaluate one model.

`gptflow evaluate CONFIG MODEL` runs it for a checkpoint directory or a registered model
(`models:/NAME@ALIAS`, `models:/NAME/VERSION`). As in the pipeline, the flow run gets an
MLflow parent run in the config's experiment, with the evaluate stage nested under it.
"""

from __future__ import annotations

from prefect import flow

from flows.pipeline_config import PipelineConfig
from flows.prepare import prepare_data
from flows.run.context import flow_run_title, flow_runtime
from tasks.evaluate import EvaluateOutput, evaluate_task


@flow(name="evaluate", flow_run_name=flow_run_title)
def evaluate_flow(config: PipelineConfig, model: str) -> EvaluateOutput:
    """Evaluate `model` on the config's val shards and held-out documents."""
    with flow_runtime(config, training=()) as run_id:
        prepared = prepare_data(config, parent_run_id=run_id)
        return evaluate_task(
            config.evaluate,
            model,
            prepared.tokenizer.tokenizer,
            prepared.shards.path,
            prepared.corpus.corpus,
            config.workspace,
            parent_run_id=run_id,
            device=config.device,
            return_state=True,
        ).result()
