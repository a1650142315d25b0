"""Training the BPE tokenizer in a child process, so that the bpe stage stops when asked.

HF `tokenizers` trains in native code that runs for minutes on a large corpus without
returning to Python, so neither Ctrl-C nor SIGTERM reach the process that called it. The
training therefore runs in a child process that the parent kills as soon as a signal (or
Prefect's cancel) interrupts its wait, and that ends by itself if the parent dies. The child
comes from a forkserver, a clean process that has imported this module but never used the
`tokenizers` thread pool (a plain fork of the parent would inherit that pool broken, and
`spawn` would re-import everything for each training).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path

from tokenizers import Tokenizer, trainers

from tasks.ingest import read_corpus
from tasks.progress import StepProgress

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload([__name__])


class TrainingFailed(RuntimeError):
    """The child process failed; the message carries its traceback."""


def train_in_child(
    tokenizer: Tokenizer, trainer: trainers.BpeTrainer, corpus: Path, destination: Path, progress: StepProgress
) -> None:
    """Train `tokenizer` with `trainer` on the corpus's train split in a child process and save
    it to `destination`; `progress` counts the documents fed to the trainer."""
    receiver, sender = _context.Pipe(duplex=False)
    child = _context.Process(
        target=_train, args=(tokenizer, trainer, corpus, destination, sender), name="bpe-trainer", daemon=True
    )
    child.start()
    sender.close()  # the child holds the only writing end: its exit closes the pipe
    try:
        while True:
            try:
                kind, payload = receiver.recv()  # a signal interrupts this wait in the main thread
            except EOFError:
                raise TrainingFailed(f"the tokenizer trainer died (exit code {child.exitcode})") from None
            if kind == "fed":
                documents, n_bytes = payload
                progress.advance(documents=documents, n_bytes=n_bytes)
            elif kind == "error":
                raise TrainingFailed(payload)
            else:
                break
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()


def _train(tokenizer: Tokenizer, trainer: trainers.BpeTrainer, corpus: Path, destination: Path, parent: Connection) -> None:
    """The child: feed the train split to the trainer, reporting each batch, then save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    try:

        def batches():
            for batch in read_corpus(corpus, split="train"):
                texts = batch.column("text").to_pylist()
                parent.send(("fed", (len(texts), sum(len(text.encode()) for text in texts))))
                yield texts

        tokenizer.train_from_iterator(batches(), trainer)
        tokenizer.save(str(destination))
    except Exception:
        parent.send(("error", traceback.format_exc()))
    else:
        parent.send(("done", None))
    finally:
        parent.close()


def _exit_with_parent() -> None:
    wait([multiprocessing.parent_process().sentinel])
    os._exit(1)
