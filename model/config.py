"""GPT hyperparameters: the model's shape, the published presets, and the pipeline's `model:` section.

`GPTConfig` is everything `model.gpt.GPT` needs to build itself. `preset(name)` gives the
GPT-2 sizes (Radford et al. 2019) and the GPT-3 sizes (Brown et al. 2020, table 2.1).
`ModelConfig` is what a pipeline YAML writes: a preset name plus any field to override;
the vocabulary size comes from the trained tokenizer, so it is filled in by `resolve`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from model.errors import UserError

# A config field's `json_schema_extra` when the field decides how a run executes (resume,
# checkpoint cadence, processes, device, parallelism), not what it computes: the stages
# leave such fields out of their fingerprints (tasks/core/training_stage.py).
RUN_ONLY = {"run_only": True}

LAYER_KINDS = ("dense", "sparse")


class GPTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: PositiveInt
    block_size: PositiveInt = Field(description="context length: the number of learned positions")
    n_layer: PositiveInt = Field(description="transformer blocks")
    n_head: PositiveInt = Field(description="attention heads per block; n_embd must be a multiple of it")
    n_embd: PositiveInt = Field(description="the width: embedding and residual stream size")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="on attention, residual and embedding outputs in training")
    bias: bool = Field(True, description="biases in Linear layers and LayerNorms, as in GPT-2")
    attention: list[str] = Field(
        default_factory=lambda: ["dense"],
        description='layer kinds, cycled over the layers: ["dense"] is GPT-2, ["dense", "sparse"] is GPT-3',
    )
    sparse_window: int = Field(256, description="a sparse layer lets position i attend to i - sparse_window < j <= i")
    # Speed choices: they change how the loss is computed, not what it is (1 and 0 turn them off).
    vocab_multiple: PositiveInt = Field(
        128,
        description="the training head multiplies by the vocabulary padded with zero rows to a multiple of this "
        "(tensor-core shapes); padded logits are never scored, stored or sampled",
    )
    loss_chunk: NonNegativeInt = Field(
        4096,
        description="positions per chunk of the fused head + cross-entropy in training (model.loss); "
        "0: whole logits, then F.cross_entropy",
    )

    @field_validator("attention")
    @classmethod
    def _known_layer_kinds(cls, kinds: list[str]) -> list[str]:
        if not kinds:
            raise ValueError(f"must name at least one layer kind, one of {list(LAYER_KINDS)}")
        for i, kind in enumerate(kinds):
            if kind not in LAYER_KINDS:
                raise ValueError(f"entry {i} is {kind!r}; each entry must be one of {list(LAYER_KINDS)}")
        return kinds

    @field_validator("sparse_window")
    @classmethod
    def _positive_window(cls, window: int) -> int:
        if window < 1:
            raise ValueError(f"is {window}; a sparse layer must see at least its own position (>= 1)")
        return window

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd / n_head channels"
            )
        return self

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_kind(self, layer: int) -> Literal["dense", "sparse"]:
        return self.attention[layer % len(self.attention)]  # type: ignore[return-value]

    @property
    def has_sparse_layers(self) -> bool:
        return "sparse" in self.attention[: self.n_layer]

    def num_params(self, include_position_embeddings: bool = True) -> int:
        """Exact parameter count of `GPT(self)`; the output head is the token embedding, counted once."""
        d, b = self.n_embd, int(self.bias)
        layer_norm = d + b * d
        attention = (d * 3 * d + b * 3 * d) + (d * d + b * d)  # c_attn (q, k, v) and c_proj
        mlp = (d * 4 * d + b * 4 * d) + (4 * d * d + b * d)  # c_fc and c_proj
        block = 2 * layer_norm + attention + mlp
        embeddings = self.vocab_size * d + include_position_embeddings * self.block_size * d
        return embeddings + self.n_layer * block + layer_norm

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B.

        6N for the weight matmuls (N without position embeddings, which are a lookup) plus
        12 * n_layer * seq_len * n_embd for the attention scores and weighted values.
        """
        return 6 * self.num_params(include_position_embeddings=False) + 12 * self.n_layer * seq_len * self.n_embd


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> GPTConfig:
    return GPTConfig(vocab_size=50257, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def _gpt3(n_layer: int, n_head: int, n_embd: int) -> GPTConfig:
    # The paper does not give the band width of its "locally banded sparse attention";
    # 256 (an eighth of the context) is our choice.
    return GPTConfig(
        vocab_size=50257,
        block_size=2048,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        attention=["dense", "sparse"],
        sparse_window=256,
    )


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256),
    "gpt2-small": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "gpt3-small": _gpt3(12, 12, 768),
    "gpt3-medium": _gpt3(24, 16, 1024),
    "gpt3-large": _gpt3(24, 16, 1536),
    # The paper lists 24 heads of 128 for a width of 2,048, which do not multiply out;
    # 16 heads of 128 keep its head size.
    "gpt3-xl": _gpt3(24, 16, 2048),
    "gpt3-2.7b": _gpt3(32, 32, 2560),
    "gpt3-6.7b": _gpt3(32, 32, 4096),
    # The paper's width 5,140 is not divisible by its 40 heads; 5,120 = 40 x 128 is.
    "gpt3-13b": _gpt3(40, 40, 5120),
    "gpt3-175b": _gpt3(96, 96, 12288),
}


def preset(name: str) -> GPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None


# What a pretrained model (init_from) fixes, and what may still be set beside it.
SHAPE_FIELDS = {"preset", "block_size", "n_layer", "n_head", "n_embd", "bias", "attention", "sparse_window"}
INIT_OVERRIDES = {"dropout", "vocab_multiple", "loss_chunk"}


def preset_override(name: str) -> Any:
    """A `model:` field that overrides the preset's GPTConfig field `name`, described as that field."""
    return Field(None, description=f"null: the preset's; else {GPTConfig.model_fields[name].description}")


class ModelConfig(BaseModel):
    """The pipeline's `model:` section: a preset, then any GPTConfig field (except the vocabulary) to
    override; or `init_from`, a pretrained model whose shape (and weights, and tokenizer) are taken."""

    model_config = ConfigDict(extra="forbid")

    init_from: str | None = Field(
        None,
        description="start from a pretrained model: a Hugging Face GPT-2 directory or hub name (gpt2, gpt2-medium), "
        "a gptflow checkpoint directory or a models:/ URI; its tokenizer replaces the trained one",
    )
    preset: str | None = Field("tiny", description=f"one of {', '.join(PRESETS)}; or null to give every field")
    block_size: PositiveInt | None = preset_override("block_size")
    n_layer: PositiveInt | None = preset_override("n_layer")
    n_head: PositiveInt | None = preset_override("n_head")
    n_embd: PositiveInt | None = preset_override("n_embd")
    dropout: float | None = preset_override("dropout")
    bias: bool | None = preset_override("bias")
    attention: list[str] | None = preset_override("attention")
    sparse_window: int | None = preset_override("sparse_window")
    vocab_multiple: PositiveInt | None = preset_override("vocab_multiple")
    loss_chunk: NonNegativeInt | None = preset_override("loss_chunk")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str | None) -> str | None:
        if name is not None and name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return name

    @model_validator(mode="after")
    def _shape_from_one_place(self) -> ModelConfig:
        shape = sorted(self.model_fields_set & SHAPE_FIELDS)
        if self.init_from is not None and shape:
            sparse_preset = self.preset is not None and "sparse" in PRESETS[self.preset].attention
            sparse = (
                " (a sparse-attention model cannot start from a dense one)"
                if "attention" in shape or ("preset" in shape and sparse_preset)
                else ""
            )
            raise ValueError(
                f"{', '.join(shape)} cannot be set with init_from: the pretrained model's shape is used{sparse}; "
                f"only {', '.join(sorted(INIT_OVERRIDES))} may change"
            )
        return self

    @model_validator(mode="after")
    def _valid_combination(self) -> ModelConfig:
        # The vocabulary is known only once the tokenizer is trained; every other constraint
        # (n_embd % n_head, the attention pattern, ...) is checked now, at load time.
        self.resolve(vocab_size=1)
        return self

    def resolve_from(self, pretrained: GPTConfig) -> GPTConfig:
        """The pretrained model's config with the fields that may change with init_from (dropout, speed)."""
        return pretrained.model_copy(update=self.model_dump(include=INIT_OVERRIDES, exclude_none=True))

    def settings(self) -> dict:
        """The section as fingerprints see it: init_from enters them by content (the tokenizer stage's
        digest of the model), not by name."""
        return self.model_dump(mode="json", exclude={"init_from"})

    def resolve(self, vocab_size: int) -> GPTConfig:
        """The preset's values, then the overrides, with the tokenizer's vocabulary size."""
        fields = PRESETS[self.preset].model_dump() if self.preset else {}
        fields.update(self.model_dump(exclude={"preset", "init_from"}, exclude_none=True))
        fields["vocab_size"] = vocab_size
        try:
            return GPTConfig(**fields)
        except ValidationError as e:
            raise ValueError("; ".join(_describe(item) for item in e.errors())) from None


def _describe(error: dict) -> str:
    """One pydantic error as `field: message` (no field for a cross-field check)."""
    message = error["msg"].removeprefix("Value error, ")
    field = ".".join(str(part) for part in error["loc"])
    return f"{field}: {message}" if field else message
