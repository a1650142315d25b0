"""MLflow records of the data stages: one nested run each for ingest, bpe and shard.

The data stages themselves know nothing of MLflow (they run the same inside or outside
the pipeline); once they have run, or been reused, this task records what they produced
under the pipeline's run: the stage config as params, the numeric report as metrics, the
manifest (and the tokenizer) as artifacts, and the corpus and the shards as MLflow
datasets whose digest is the stage fingerprint, so two runs that trained on the same
data show the same digest in the UI.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.bpe import BPEConfig, BPEOutput
from tasks.core.workspace import MANIFEST
from tasks.ingest import IngestConfig, IngestOutput
from tasks.shard import ShardConfig, ShardOutput
from tasks.tracking import runs


def numeric(report: dict[str, Any]) -> dict[str, float]:
    """The report's figures that MLflow can chart (numbers, not flags or names)."""
    return {
        key: float(value)
        for key, value in runs.flatten(report).items()
        if isinstance(value, Real) and not isinstance(value, bool)
    }


def record_stage(parent_run_id: str, stage: str, config: BaseModel, output: Any, extra_artifacts: tuple = ()) -> str:
    with runs.child_run(
        parent_run_id, stage, tags={"fingerprint": output.fingerprint, "reused": str(output.reused)}
    ) as run_id:
        runs.log_params(run_id, {stage: config.model_dump(mode="json")})
        runs.log_metrics(run_id, numeric(output.report))
        for path in (output.path / MANIFEST, *extra_artifacts):
            runs.log_artifact(run_id, path, stage)
    return run_id


@task(name="track-data", cache_policy=NO_CACHE)
def track_data_task(
    ingest: IngestConfig,
    bpe: BPEConfig,
    shard: ShardConfig,
    corpus: IngestOutput,
    tokenizer: BPEOutput,
    shards: ShardOutput,
    parent_run_id: str,
) -> None:
    """Nested runs for the three data stages; the corpus and shards as datasets of the pipeline run."""
    ingest_run = record_stage(parent_run_id, "ingest", ingest, corpus)
    record_stage(parent_run_id, "bpe", bpe, tokenizer, extra_artifacts=(tokenizer.tokenizer,))
    shard_run = record_stage(parent_run_id, "shard", shard, shards)
    corpus_profile = numeric(corpus.report)
    for run_id in (ingest_run, parent_run_id):
        runs.log_dataset(run_id, "corpus", corpus.fingerprint, corpus.corpus, context="source", profile=corpus_profile)
    shard_profile = numeric(shards.report)
    for run_id in (shard_run, parent_run_id):
        runs.log_dataset(run_id, "shards", shards.fingerprint, shards.path, context="training", profile=shard_profile)
