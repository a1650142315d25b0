"""The data-preparation flow: ingest -> train-tokenizer -> shard, and its report artifact.

`prepare_data` is the Prefect flow; the pretraining, fine-tuning and pipeline flows call
it as a subflow. The ingest and shard stages' chunks run as `ingest-chunk` and
`shard-chunk` task runs on the task runner of the config's `task_runner:` section (threads,
processes, or a Dask cluster), whichever runner the calling flow has. Only the ingest of a
Hugging Face dataset is retried: it reads over the network, where a dropped connection is
worth another try; local files and the stages after ingest fail the same way every time.
`prepare_data_locally` runs the same three stages as plain functions, without Prefect, for
tests and scripts that need prepared data quickly. Both reuse any stage whose manifest exists and verifies, so a
rerun redoes only what changed.
"""

# No `from __future__ import annotations`: Prefect validates a flow's parameters against its
# annotations, which do not resolve as strings when a deployment runs the pipeline.
from collections.abc import Callable
from typing import Any

from prefect import Task, flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.states import State, get_state_exception
from pydantic import BaseModel

from flows.pipeline_config import PipelineConfig
from flows.runners import TaskRunnerConfig, make_task_runner
from model.errors import UserError
from tasks import tracking
from tasks.bpe import BPEOutput, run_bpe, train_tokenizer_task
from tasks.core.storage import resolve_workspace
from tasks.ingest import (
    HF_PREFIX,
    IngestConfig,
    IngestOutput,
    find_source_files,
    ingest_chunk_task,
    ingest_task,
    run_ingest,
)
from tasks.models.sources import open_model
from tasks.shard import (
    ShardOutput,
    check_shard_bytes,
    encode_chunk_task,
    run_shard,
    shard_task,
)
from tasks.tracking.datasets import track_data_task
from tasks.tracking.stage_run import artifact_key

# Seconds before each retry of a remote source's ingest: a blip, then a short outage.
REMOTE_RETRY_DELAYS = [10, 60]


class PreparedData(BaseModel):
    corpus: IngestOutput
    tokenizer: BPEOutput
    shards: ShardOutput

    def stages(self) -> dict[str, IngestOutput | BPEOutput | ShardOutput]:
        return {"ingest": self.corpus, "bpe": self.tokenizer, "shard": self.shards}

    def summary(self) -> str:
        """Each stage: built or reused, where its output is, and its headline figures."""
        corpus, tokenizer, shards = self.corpus.report, self.tokenizer.report, self.shards.report
        rows = [
            (
                "ingest",
                self.corpus,
                self.corpus.corpus,
                f"{corpus['documents_train']} train / {corpus['documents_val']} "
                f"val documents, {corpus['bytes_train'] + corpus['bytes_val']:,} bytes",
            ),
            (
                "bpe",
                self.tokenizer,
                self.tokenizer.tokenizer,
                f"vocab {tokenizer['vocab_size']}, {tokenizer['val_bytes_per_token']} bytes/token on val",
            ),
            (
                "shard",
                self.shards,
                self.shards.manifest,
                f"{shards['train_rows']} train / {shards['val_rows']} val windows",
            ),
        ]
        return "\n".join(
            f"{stage:<7} {'reused' if output.reused else 'built':<7} {path}\n{'':<15} {figures}"
            for stage, output, path, figures in rows
        )


def check_prepare_config(config: PipelineConfig) -> None:
    """User errors that show before any work: a missing source, a glob that matches
    nothing, shards too small for one window, a pretrained model (init_from) that cannot load."""
    find_source_files(config.ingest)
    check_shard_bytes(config.shard, config.bpe.vocab_size)
    if config.model.init_from is not None:
        # Loaded once more by the tokenizer stage: a model that cannot load must stop the run
        # before ingest writes anything.
        open_model(config.model.init_from)


@flow(name="prepare-data", flow_run_name="prepare-data-{config.name}")
def prepare_data(config: PipelineConfig, parent_run_id: str | None = None) -> PreparedData:
    """Ingest the corpus, train the tokenizer, write the shards; publish the reports, and
    record the stages under the MLflow run `parent_run_id` (the calling flow's) when given.

    The ingest and shard chunks run as task runs on the config's task runner. On a Dask
    cluster at an address (`task_runner.remote_workers`), possibly on other machines, their
    part files go to the stage's directory in the workspace, which every worker must reach
    (an s3:// workspace or a shared filesystem), and a local ingest source must be at the
    same path on every worker: a chunk that does not find its files stops the stage with a
    UserError naming the file and the worker's host."""
    remote = config.task_runner.remote_workers
    corpus = ingest_for(config.ingest)(
        config.ingest,
        config.workspace,
        map_chunks=task_runs_on(config.task_runner, ingest_chunk_task),
        parts_in_workspace=remote,
        return_state=True,
    ).result()
    tokenizer = train_tokenizer_task(
        config.bpe, corpus, config.workspace, config.model.init_from, return_state=True
    ).result()
    shards = shard_task(
        config.shard,
        corpus,
        tokenizer,
        config.workspace,
        map_chunks=task_runs_on(config.task_runner, encode_chunk_task),
        parts_in_workspace=remote,
        return_state=True,
    ).result()
    prepared = PreparedData(corpus=corpus, tokenizer=tokenizer, shards=shards)
    where = f"workspace `{resolve_workspace(config.workspace)}`"
    create_table_artifact(
        key=artifact_key(config.name, "data-report"),
        table=report_rows(prepared),
        description=f"Data preparation reports of `{config.name}` ({where})",
    )
    if parent_run_id is None:
        tracked = "Not tracked in MLflow: `gptflow run` or `gptflow pretrain` record the data stages."
    else:
        track_data_task(config.ingest, config.bpe, config.shard, corpus, tokenizer, shards, parent_run_id=parent_run_id)
        tracked = f"**MLflow run:** {tracking.run_link(parent_run_id)} (nested runs ingest, bpe, shard)"
    create_markdown_artifact(
        key=artifact_key(config.name, "data"),
        markdown=f"# Data of `{config.name}`\n\n```\n{prepared.summary()}\n```\n\n{tracked}\n",
        description=f"Where each data stage's output is, its headline figures, and its MLflow run ({where})",
    )
    return prepared


def ingest_for(config: IngestConfig) -> Task:
    """The ingest task, with retries when its source is remote (a Hugging Face dataset).

    A retry starts the stage afresh: its uncommitted directory is reset first."""
    if not config.source.startswith(HF_PREFIX):
        return ingest_task
    return ingest_task.with_options(
        retries=len(REMOTE_RETRY_DELAYS), retry_delay_seconds=REMOTE_RETRY_DELAYS, retry_condition_fn=may_be_the_network
    )


def may_be_the_network(task: Task, task_run: TaskRun, state: State) -> bool:
    """Whether a failed ingest of a remote source is worth another try.

    A UserError names a problem of the config (a misspelt dataset, a missing column) that
    a retry would only repeat, unless what it reports is a lost connection; any other
    failure while reading over the network may be the network's doing.
    """
    error = get_state_exception(state)
    return isinstance(error.__cause__, ConnectionError) if isinstance(error, UserError) else True


def task_runs_on(runner: TaskRunnerConfig, chunk_task: Task) -> Callable[[list[Any]], list[Any]]:
    """Map a stage's chunks as task runs of `chunk_task` (`ingest-chunk`, `shard-chunk`) on
    the configured task runner; their results in chunk order.

    The runner is started here rather than given to the flow's decorator, so the config
    chooses it even when another flow calls `prepare_data` as a subflow."""

    def map_chunks(chunks: list[Any]) -> list[Any]:
        with make_task_runner(runner) as task_runner:
            futures = task_runner.map(chunk_task, {"chunk": chunks})
            return [future.result() for future in futures]

    return map_chunks


def prepare_data_locally(config: PipelineConfig) -> PreparedData:
    """The flow's three stages as plain function calls: no Prefect, no artifact."""
    corpus = run_ingest(config.ingest, config.workspace)
    tokenizer = run_bpe(config.bpe, corpus, config.workspace, config.model.init_from)
    shards = run_shard(config.shard, corpus, tokenizer, config.workspace)
    return PreparedData(corpus=corpus, tokenizer=tokenizer, shards=shards)


def report_rows(prepared: PreparedData) -> list[dict[str, Any]]:
    """One row per report figure: stage, field, value (plus where and whether reused)."""
    rows = []
    for stage, output in prepared.stages().items():
        rows.append({"stage": stage, "field": "fingerprint", "value": output.fingerprint})
        rows.append({"stage": stage, "field": "reused", "value": output.reused})
        rows += [{"stage": stage, "field": field, "value": value} for field, value in output.report.items()]
    return rows
