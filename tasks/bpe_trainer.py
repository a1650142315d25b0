"""Training the BPE tokenizer in a child process, so that the bpe stage stops when asked.

HF `tokenizers` trains in native code that runs for minutes on a large corpus without
returning to Python, so neither Ctrl-C nor SIGTERM reach the process that called it. The
training therefore runs in a child process, `python -m tasks.bpe_trainer`, that the parent
kills as soon as a signal (or Prefect's cancel) interrupts its wait, and that ends by itself
when the parent dies (its stdin, a pipe from the parent, closes). A plain subprocess rather
than `multiprocessing`: spawn and forkserver re-run the parent's main module in the child
(a script without a `__main__` guard would start over), and a fork would copy the
`tokenizers` thread pool broken.

The protocol: the parent passes the untrained tokenizer (its JSON), the trainer's settings and
the sample's (`bpe.max_train_bytes` and the train split's bytes: tasks/bpe_sample.py) on the
command line; the child writes one JSON line per batch fed to the trainer,
`{"documents": n, "bytes": n}`, then saves the tokenizer; any failure ends it with a
traceback on stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, pre_tokenizers, trainers

if TYPE_CHECKING:
    from tasks.core.progress import StepProgress


class TrainingFailed(RuntimeError):
    """The child process failed; the message carries its error output."""


def train_in_child(
    tokenizer: Tokenizer,
    settings: dict[str, Any],
    sample: dict[str, int | None],
    corpus: Path,
    destination: Path,
    progress: StepProgress,
) -> dict[str, int]:
    """Train `tokenizer` with a BpeTrainer of `settings` on the corpus's train split (sampled as
    `sample` says: `train_batches`' arguments), in a child process, and save it to `destination`;
    `progress` counts the documents fed. Returns the documents and bytes fed."""
    arguments = [tokenizer.to_str(), json.dumps(settings), json.dumps(sample), str(corpus), str(destination)]
    fed_in_all = {"documents": 0, "bytes": 0}
    command = [sys.executable, "-m", "tasks.bpe_trainer", *arguments]
    # stderr to a file: a pipe nobody reads while the child runs could fill up and block it.
    with tempfile.TemporaryFile("w+") as errors:
        child = None
        try:
            # Inside the try: a signal handled as Popen returns must not leave the child running.
            child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
            for line in child.stdout:  # a signal interrupts this wait in the main thread
                fed = json.loads(line)
                progress.advance(documents=fed["documents"], n_bytes=fed["bytes"])
                fed_in_all = {key: count + fed[key] for key, count in fed_in_all.items()}
            if child.wait() != 0:
                errors.seek(0)
                raise TrainingFailed(f"the tokenizer trainer failed (exit code {child.returncode}):\n{errors.read()}")
            return fed_in_all
        finally:
            if child is not None:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                child.stdin.close()
                child.stdout.close()


def main(tokenizer_json: str, settings: str, sample: str, corpus: str, destination: str) -> None:
    """The child: feed the train split (or its sample) to the trainer, reporting each batch, then save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    threading.Thread(target=exit_with_parent, daemon=True).start()
    # Imported only now, with the watchdog running: it takes a second (Prefect comes with it),
    # and a parent that dies meanwhile must not leave the child to start training.
    from tasks.bpe_sample import train_batches

    tokenizer = Tokenizer.from_str(tokenizer_json)
    trainer = trainers.BpeTrainer(
        **json.loads(settings), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )

    def batches():
        for texts in train_batches(Path(corpus), **json.loads(sample)):
            print(json.dumps({"documents": len(texts), "bytes": sum(len(text.encode()) for text in texts)}), flush=True)
            yield texts

    tokenizer.train_from_iterator(batches(), trainer)
    tokenizer.save(destination)


def exit_with_parent() -> None:
    """End the process when the parent's end of stdin closes: the parent died (even by SIGKILL)."""
    sys.stdin.read()
    os._exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:])
