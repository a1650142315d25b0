"""The pretraining flow: prepare the data (a subflow, reused when done), then pretrain.

Like the pipeline, the flow run gets an MLflow parent run with the resolved config, and the
pretrain task a nested run under it; training holds a slot of the `gpu` concurrency limit.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.pipeline_config import PipelineConfig, load_config
from flows.prepare import prepare_data
from flows.run.context import flow_run_title, flow_runtime
from flows.run.training import pretrained
from tasks.pretrain import PretrainOutput


@flow(name="pretrain", flow_run_name=flow_run_title)
def pretrain(
    config: PipelineConfig | str | Path = "configs/tiny.yaml", overrides: list[str] | None = None
) -> PretrainOutput:
    """Shards from the config's corpus, then a pretrained checkpoint; `config` is a YAML path or a PipelineConfig."""
    if not isinstance(config, PipelineConfig):
        config = load_config(config, overrides or ())
    with flow_runtime(config, training=("pretrain",)) as run_id:
        prepared = prepare_data(config, parent_run_id=run_id)
        return pretrained(config, prepared, run_id)
