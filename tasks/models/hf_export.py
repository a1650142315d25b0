"""`gptflow export`: a model as a Hugging Face directory, with its tokenizer, generation settings and card.

    config.json              GPT2LMHeadModel's config (model.export), plus {"gptflow": {"prompt_format"}}
    model.safetensors        the weights in GPT-2's layout
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   written by transformers
    generation_config.json   the model's eos and pad ids, top-k 40 sampling (as GPT-2 shipped)
    README.md                the model card: lineage (fingerprints, MLflow run, figures) where known

so that `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`
load it with no gptflow code. The directory is written beside OUT_DIR and renamed into
place: a refused or failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from model.errors import UserError
from model.export import export_hf
from model.special_tokens import EOS, PAD, SEP
from tasks.models.sources import GPTFLOW_CONFIG_KEY, SourceModel

TOP_K = 40  # GPT-2's sampling default, as `gptflow generate` uses
# The lineage a model card lists, in order; a value the model does not record shows as "unknown".
CARD_LINEAGE = {
    "data_fingerprint": "corpus (ingest) fingerprint",
    "tokenizer_fingerprint": "tokenizer (bpe) fingerprint",
    "shards_fingerprint": "shards fingerprint",
    "mlflow_run_id": "MLflow run",
    "model_uri": "registered model",
    "checkpoint": "checkpoint",
    "source": "pretrained source",
}


def require_hf_extra() -> None:
    """Stop with one line when `transformers` is missing: only the `hf` extra installs it
    (a plain `pip install .` leaves it out, and its import costs seconds other commands skip)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(
            "gptflow export needs transformers, which the hf extra installs: pip install 'gptflow[hf]' "
            "(from a clone: pip install '.[hf]')"
        ) from None


def export_model(source: SourceModel, out_dir: Path) -> Path:
    """Write `source` as a Hugging Face model directory at `out_dir` (replacing what is there)."""
    require_hf_extra()
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    config = source.model.config
    if config.has_sparse_layers:
        raise UserError(
            f"cannot export: the model has sparse attention layers (attention={config.attention}), which "
            "GPT2LMHeadModel cannot express (it has only dense attention)"
        )
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_hf(source.model, tmp, source.special)
        hf_config = json.loads((tmp / "config.json").read_text())
        hf_config[GPTFLOW_CONFIG_KEY] = {"prompt_format": source.prompt_format}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=source.tokenizer,
            bos_token=EOS,
            eos_token=EOS,
            pad_token=PAD,
            sep_token=SEP,
            model_max_length=config.block_size,
        )
        tokenizer.save_pretrained(tmp)
        special_map = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD, "sep_token": SEP}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
        GenerationConfig(
            bos_token_id=source.special.eos,
            eos_token_id=source.special.eos,
            pad_token_id=source.special.pad,
            do_sample=True,
            top_k=TOP_K,
        ).save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(source, out_dir.name))
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def model_card(source: SourceModel, name: str) -> str:
    """README.md: what the model is, how to load and prompt it, and where it came from."""
    config = source.model.config
    lineage = "\n".join(f"| {label} | {source.lineage.get(key, 'unknown')} |" for key, label in CARD_LINEAGE.items())
    figures = {key: value for key, value in source.lineage.items() if key not in CARD_LINEAGE}
    figure_rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(figures.items())) or "| unknown | |"
    if source.prompt_format == "pair":
        usage = "Fine-tuned on prompt/completion pairs: prompt with `prompt <|sep|>`; it ends with `<|endoftext|>`."
    else:
        usage = "A pretrained model: prompt with `<|endoftext|>` then the start of a document."
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, gptflow]
---

# {name}

A GPT-2 model ({config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, context
{config.block_size}, vocabulary {config.vocab_size}) trained with gptflow.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

{usage} Special ids: end of text {source.special.eos}, pad {source.special.pad}, separator {source.special.sep}.

## Lineage

| | |
|---|---|
{lineage}
| weights sha256 | {source.digest} |

## Figures and tags

| | |
|---|---|
{figure_rows}
"""


def push_directory(directory: Path, repo_id: str) -> str:
    """Upload `directory` to the hub repository `repo_id` (created if need be); returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="gptflow export")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({e}); the export at {directory} stays") from None
    return f"https://huggingface.co/{repo_id}"
