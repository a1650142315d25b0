"""Shared machinery of the stages: stage directories and manifests (workspace), local and
s3:// storage, the checkpoint mirror, what the two training stages share (training_stage),
progress bars and the record of the servers `gptflow up` started. Nothing here knows a
particular stage. Where models come from and go to is `tasks.models`."""
