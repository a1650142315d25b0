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
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext

# Artifact names: the safetensors weights, the GPTConfig JSON, the tokenizer.json, the checkpoint's
# tokens.json (special ids and prompt format; absent from models logged before it existed).
WEIGHTS_ARTIFACT, CONFIG_ARTIFACT, TOKENIZER_ARTIFACT, TOKENS_ARTIFACT = "weights", "config", "tokenizer", "tokens"

# Defaults of the inference params (the signature declares them with these values).
PARAM_DEFAULTS = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 40, "top_p": 1.0, "seed": -1, "device": "auto"}


class TextGenerator(PythonModel):
    """Prompts in, completions out: `list[str] -> list[str]`."""

    # The declared signature (with the sampling params) validates inputs; MLflow's
    # type-hint validation would replace it, so it is switched off.
    _skip_type_hint_validation = True

    def load_context(self, context: PythonModelContext) -> None:
        import safetensors.torch
        from tokenizers import Tokenizer

        from model.config import GPTConfig
        from model.device import resolve_device
        from model.gpt import GPT

        config = GPTConfig.model_validate_json(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        self.model = GPT(config)
        safetensors.torch.load_model(self.model, context.artifacts[WEIGHTS_ARTIFACT])
        self.model.to(resolve_device(PARAM_DEFAULTS["device"])).eval()
        self.tokenizer = Tokenizer.from_file(context.artifacts[TOKENIZER_ARTIFACT])
        # Typed text that looks like a special token is plain text, as everywhere (model/special_tokens.py).
        self.tokenizer.encode_special_tokens = True

    # No type hints on `model_input`: MLflow would derive a signature from them and drop the
    # declared sampling params. The input arrives as a list of strings, or as a DataFrame or
    # Series when it comes from `mlflow models serve` or a pandas caller.
    def predict(self, context: PythonModelContext, model_input, params: dict | None = None) -> list[str]:
        from model.device import resolve_device
        from model.generate import generate
        from model.special_tokens import special_ids

        if hasattr(model_input, "columns"):  # a DataFrame: the prompts are its first column
            model_input = model_input.iloc[:, 0]
        settings = {**PARAM_DEFAULTS, **(params or {})}
        self.model.to(resolve_device(str(settings["device"]), field="the device param"))  # no-op where it already is
        # Training saw every document after an <|endoftext|>: starting there puts a prompt in
        # the same position (and lets an empty prompt start a fresh document).
        eos = special_ids(self.tokenizer).eos
        prompts = [[eos, *self.tokenizer.encode(text, add_special_tokens=False).ids] for text in list(model_input)]
        completions = generate(
            self.model,
            prompts,
            max_new_tokens=int(settings["max_new_tokens"]),
            temperature=float(settings["temperature"]),
            top_k=int(settings["top_k"]) or None,
            top_p=float(settings["top_p"]),
            eos_id=eos,
            seed=None if int(settings["seed"]) < 0 else int(settings["seed"]),
        )
        return [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in completions]


mlflow.models.set_model(TextGenerator())
