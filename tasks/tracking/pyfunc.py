"""The registered model: an MLflow pyfunc that turns prompts into completions.

It bundles three artifacts, none of them pickled: the weights (safetensors), the
GPTConfig (JSON) and the tokenizer (`tokenizer.json`). The model is logged "from code":
MLflow stores this file and runs it when loading, with the `model/` package bundled next
to it, so `mlflow.pyfunc.load_model("models:/NAME@champion").predict(["def fib(n):"])`
works in any process that has torch, tokenizers and safetensors.

Sampling settings are inference params declared in the signature:
`predict(prompts, params={"max_new_tokens": 32, "temperature": 0.8, "seed": 1})`. The model
loads on the first GPU when there is one (else the CPU); the `device` param (auto, the
default, or cpu, cuda, cuda:N) says where a call runs, moving the model there if need be.

Prompts are laid out as `gptflow generate` lays them out (model/prompts.py): the
`prompt_format` param is auto (the model's own: `prompt <|sep|>` for a model gptflow
fine-tuned, else a document after `<|endoftext|>`), document or pair; the `examples` param,
JSON Lines of {prompt, completion}, primes every prompt with them. A prompt longer than
`block_size - max_new_tokens` tokens keeps its end, and a warning says how many were dropped.
Text like `<|sep|>` in a prompt is plain text, as everywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext

# Artifact names: the safetensors weights, the GPTConfig JSON, the tokenizer.json, the checkpoint's
# tokens.json (special ids and prompt format; absent from models logged before it existed).
WEIGHTS_ARTIFACT, CONFIG_ARTIFACT, TOKENIZER_ARTIFACT, TOKENS_ARTIFACT = "weights", "config", "tokenizer", "tokens"

# Defaults of the inference params (the signature declares them with these values).
PARAM_DEFAULTS = {
    "max_new_tokens": 64,
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 1.0,
    "seed": -1,
    "device": "auto",
    "prompt_format": "auto",
    "examples": "",
}
PROMPT_FORMATS = ("auto", "document", "pair")
logger = logging.getLogger(__name__)


class TextGenerator(PythonModel):
    """Prompts in, completions out: `list[str] -> list[str]`."""

    # The declared signature (with the sampling params) validates inputs; MLflow's
    # type-hint validation would replace it, so it is switched off.
    _skip_type_hint_validation = True

    def load_context(self, context: PythonModelContext) -> None:
        import safetensors.torch
        from tokenizers import Tokenizer

        from model.checkpoint import CheckpointTokens
        from model.config import GPTConfig
        from model.device import resolve_device
        from model.gpt import GPT
        from model.special_tokens import special_ids

        config = GPTConfig.model_validate_json(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        self.model = GPT(config)
        safetensors.torch.load_model(self.model, context.artifacts[WEIGHTS_ARTIFACT])
        self.model.to(resolve_device(PARAM_DEFAULTS["device"])).eval()
        self.tokenizer = Tokenizer.from_file(context.artifacts[TOKENIZER_ARTIFACT])
        # Typed text that looks like a special token is plain text, as everywhere (model/special_tokens.py).
        self.tokenizer.encode_special_tokens = True
        if TOKENS_ARTIFACT in context.artifacts:  # the checkpoint's special ids and prompt format
            tokens = CheckpointTokens.model_validate_json(Path(context.artifacts[TOKENS_ARTIFACT]).read_text())
            self.special, self.prompt_format = tokens.special_ids, tokens.prompt_format
        else:  # logged before checkpoints carried them: a pretrained model
            self.special, self.prompt_format = special_ids(self.tokenizer), "document"

    # No type hints on `model_input`: MLflow would derive a signature from them and drop the
    # declared sampling params. The input arrives as a list of strings, or as a DataFrame or
    # Series when it comes from `mlflow models serve` or a pandas caller.
    def predict(self, context: PythonModelContext, model_input, params: dict | None = None) -> list[str]:
        from model.device import resolve_device
        from model.errors import UserError
        from model.generate import generate
        from model.prompts import parse_examples, prompt_rows

        if hasattr(model_input, "columns"):  # a DataFrame: the prompts are its first column
            model_input = model_input.iloc[:, 0]
        settings = {**PARAM_DEFAULTS, **(params or {})}
        self.model.to(resolve_device(str(settings["device"]), field="the device param"))  # no-op where it already is
        prompt_format = str(settings["prompt_format"])
        if prompt_format not in PROMPT_FORMATS:
            raise UserError(f"the prompt_format param is {prompt_format!r}; one of {', '.join(PROMPT_FORMATS)}")
        examples = str(settings["examples"])
        max_new_tokens = int(settings["max_new_tokens"])
        rows = prompt_rows(
            [str(text) for text in model_input],
            lambda text: self.tokenizer.encode(text, add_special_tokens=False).ids,
            self.special,
            self.prompt_format if prompt_format == "auto" else prompt_format,
            self.model.config.block_size,
            max_new_tokens,
            examples=parse_examples(examples, "the examples param") if examples.strip() else None,
            examples_source="the examples param",
        )
        for i, row in enumerate(rows):
            if row.dropped_tokens:
                logger.warning("prompt %d: dropped its first %d tokens to fit the context", i, row.dropped_tokens)
        completions = generate(
            self.model,
            [row.ids for row in rows],
            max_new_tokens=max_new_tokens,
            temperature=float(settings["temperature"]),
            top_k=int(settings["top_k"]) or None,
            top_p=float(settings["top_p"]),
            eos_id=self.special.eos,
            seed=None if int(settings["seed"]) < 0 else int(settings["seed"]),
        )
        return [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in completions]


mlflow.models.set_model(TextGenerator())
