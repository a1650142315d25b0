"""What the tests share: micro worlds small enough to build in seconds, and the helpers that run them.

- configs: the micro GPT and training settings, and the config files of the micro worlds
- corpus: micro corpora, a toy tokenizer, shards and batch streams
- models: tiny GPTs, their checkpoints, and what a checkpoint must answer
- digests: file digests to compare stage outputs byte for byte
- processes: fresh interpreters and torchrun launches in the repository
- progress: the plain progress lines of a stage's phases, read back
- sigint: child processes a test stops with SIGINT
- ports: free loopback ports for the servers tests start
- compose, postgres, infra_stack: infra/'s stack run without Docker
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
