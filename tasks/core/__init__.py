"""Shared machinery of the stages: stage directories and manifests (workspace), local and
s3:// storage, the checkpoint mirror, what the two training stages share (training_stage),
where a model is loaded from (model_source), progress bars and the record of the servers
`gptflow up` started. Nothing here knows a particular stage; only model_source reads the
registry (through tasks.tracking.registry)."""
