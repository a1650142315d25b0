"""The end-to-end pipeline: data -> pretrain -> evaluate -> finetune -> evaluate -> register.

One Prefect flow, `pipeline`, with the data stages as the `prepare-data` subflow. Tasks
pass paths and small records. Every stage skips when its manifest exists and verifies, so
a rerun after a failure resumes at the failed stage (training from its newest
checkpoint). Training stages hold a slot of the global concurrency limit `gpu` (one slot
per device) so two pipelines never train on one device at once.

MLflow: one parent run per flow run, tagged with the Prefect flow-run id and UI link,
holding the resolved config and the headline figures; a nested run per stage. The flow
run publishes a markdown artifact with the key figures and the MLflow link.
"""

# No `from __future__ import annotations`: Prefect validates the flow's parameters against
# its annotations, and a deployment loads this file where string annotations do not resolve.
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.pipeline_config import PipelineConfig, load_config
from flows.prepare import prepare_data
from flows.run.context import flow_run_title, flow_runtime, registry_limit
from flows.run.crashed_starts import start_again_if_it_never_ran
from flows.run.gate_events import announce_gate
from flows.run.slots import holding
from flows.run.training import finetuned, pretrained
from flows.stages import StepRecord, pipeline_steps
from tasks import tracking
from tasks.evaluate import EvaluateOutput, evaluate_task
from tasks.register import EvalData, RegisterOutput, register_task
from tasks.tracking.stage_run import artifact_key


class PipelineResult(BaseModel):
    mlflow_run_id: str
    mlflow_run_link: str
    final_checkpoint: Path
    metrics: dict[str, float]
    registered: RegisterOutput
    stages: dict[str, StepRecord]  # what each step wrote or reused, by its label (flows/stages.py)


def summary_markdown(config: PipelineConfig, result: PipelineResult, evaluations: dict[str, EvaluateOutput]) -> str:
    rows = "".join(
        f"| {stage} | {figure} | {output.metrics[figure]:.4f} |\n"
        for stage, output in evaluations.items()
        for figure in ("val_loss", "val_perplexity", "val_bits_per_byte", "doc_bits_per_byte")
        if figure in output.metrics
    )
    registered = result.registered
    return (
        f"# Pipeline `{config.name}`\n\n"
        f"| evaluation | figure | value |\n|---|---|---|\n{rows}\n"
        f"**Registered:** `{registered.model_uri}` (alias `candidate`); champion is version "
        f"{registered.champion_version}.\n\n**Gate:** {registered.decision}\n\n"
        f"**MLflow run:** {result.mlflow_run_link}\n"
    )


@flow(name="pipeline", flow_run_name=flow_run_title, on_crashed=[start_again_if_it_never_ran])
def pipeline(
    config: PipelineConfig | str | Path = "configs/tiny.yaml", overrides: list[str] | None = None
) -> PipelineResult:
    """Corpus to registered model; `config` is a YAML path or a PipelineConfig."""
    if not isinstance(config, PipelineConfig):
        config = load_config(config, overrides or ())
    workspace = config.workspace

    with flow_runtime(config) as run_id:
        data = prepare_data(config, parent_run_id=run_id)
        corpus, tokenizer, shards = data.corpus, data.tokenizer, data.shards

        def evaluate(label: str, checkpoint: Path) -> EvaluateOutput:
            """One evaluation, named after the model it scores in Prefect and MLflow alike."""
            name = f"evaluate-{label}"
            return evaluate_task.with_options(task_run_name=name)(
                config.evaluate,
                checkpoint,
                tokenizer.tokenizer,
                shards.path,
                corpus.corpus,
                workspace,
                parent_run_id=run_id,
                device=config.device,
                run_name=name,
                parent_prefix=f"{label}_",
                return_state=True,
            ).result()

        pretrain = pretrained(config, data, run_id)
        evaluations = {"pretrained": evaluate("pretrained", pretrain.checkpoint)}
        final_checkpoint = pretrain.checkpoint
        if config.finetune is not None:
            # A registered model named in the config wins over this run's pretraining output.
            finetune = finetuned(config, config.finetune.start_from or pretrain.checkpoint, data, run_id)
            evaluations["finetuned"] = evaluate("finetuned", finetune.checkpoint)
            final_checkpoint = finetune.checkpoint

        outputs = {"ingest": corpus, "train-tokenizer": tokenizer, "shard": shards, "pretrain": pretrain}
        outputs |= {f"evaluate-{label}": output for label, output in evaluations.items()}
        if config.finetune is not None:
            outputs["finetune"] = finetune
        final = evaluations["finetuned" if config.finetune is not None else "pretrained"]
        lineage = {
            "data_fingerprint": corpus.fingerprint,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "shards_fingerprint": shards.fingerprint,
            "prefect_flow_run_id": str(flow_run.id),
        }
        with holding(registry_limit(config.name)):
            registered = register_task(
                config.register,
                config.name,
                final_checkpoint,
                tokenizer.tokenizer,
                final.metrics,
                lineage,
                EvalData(config.evaluate, shards.path, corpus.corpus),
                parent_run_id=run_id,
                device=config.device,
            )
        announce_gate(registered, config.register.gate_metric, run_id)
        result = PipelineResult(
            mlflow_run_id=run_id,
            mlflow_run_link=tracking.run_link(run_id),
            final_checkpoint=final_checkpoint,
            metrics=final.metrics,
            registered=registered,
            # In the steps' order (flows/stages.py): a listed step the pipeline did not run fails here.
            stages={step.label: StepRecord.of(outputs[step.label]) for step in pipeline_steps(config) if step.planner},
        )
    create_markdown_artifact(
        key=artifact_key(config.name, "pipeline"),
        markdown=summary_markdown(config, result, evaluations),
        description=f"Key figures of pipeline `{config.name}` and its MLflow run",
    )
    return result
