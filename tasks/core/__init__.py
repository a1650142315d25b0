"""Shared machinery of the stages: stage directories and manifests (workspace), local and
s3:// storage, the checkpoint mirror, where a model is loaded from (model_source), progress
bars and the record of the servers `gptflow up` started. Nothing here knows a stage; only
model_source reads the registry (through tasks.tracking.registry)."""
