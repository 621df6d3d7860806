"""Config dataclasses whose field names are the diffusers/transformers config.json names.

Every model config subclasses `ModelConfig`, so `SomeConfig.from_dict(reference.config)` accepts a
real `config.json` (or `transformers_config.to_dict()`) and rejects fields it does not know, instead
of silently ignoring a setting that would change the numbers.
"""
import dataclasses
from typing import Any, ClassVar, Mapping

MAX_BLOCKS = 16  # resolution levels of a UNet/VAE (released models have 3 or 4)
# Keys every transformers `PretrainedConfig.to_dict()` carries that say nothing about the architecture.
TRANSFORMERS_GENERIC_KEYS = frozenset({
    "transformers_version", "architectures", "output_hidden_states", "output_attentions", "return_dict",
    "dtype", "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "model_type", "pad_token_id", "bos_token_id", "initializer_range", "initializer_factor",
    "tie_word_embeddings", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "use_cache", "attention_dropout", "dropout",
})


@dataclasses.dataclass
class ModelConfig:
    # Keys that a reference config may carry but that do not change the computation (e.g. dropout at 0).
    inert_keys = frozenset()
    # field -> (smallest, largest) for every count and width: far beyond any released model, small enough
    # that a crafted config or checkpoint is refused before anything is built (not after minutes of it).
    size_bounds: ClassVar[dict] = {}

    @classmethod
    def check_sizes(cls, config: Mapping[str, Any]):
        for name, (low, high) in cls.size_bounds.items():
            value = config.get(name)
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item is None:
                    continue
                if not isinstance(item, int) or isinstance(item, bool) or not low <= item <= high:
                    raise ValueError(f"{cls.__name__}: {name}={value!r} is out of range: each must be a whole "
                                     f"number in [{low}, {high}]. The config (or the checkpoint it was read from) "
                                     f"is damaged or not for this model.")
            if isinstance(value, (list, tuple)) and len(value) > MAX_BLOCKS:
                raise ValueError(f"{cls.__name__}: {name} has {len(value)} entries; at most {MAX_BLOCKS}.")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]):
        cls.check_sizes(config)
        names = {field.name for field in dataclasses.fields(cls)}
        known = {k: v for k, v in config.items() if k in names}
        unknown = sorted(
            k for k in config
            if k not in names and not k.startswith("_") and k not in cls.inert_keys
            and k not in TRANSFORMERS_GENERIC_KEYS
        )
        if unknown:
            raise ValueError(
                f"{cls.__name__} does not know the config field(s) {unknown}. sd_core would silently ignore "
                f"them and compute something else; remove them or check that the config is for this model type."
            )
        return cls(**known)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def require(self, condition: bool, message: str):
        if not condition:
            raise ValueError(f"{type(self).__name__}: {message}")


def per_block(value, num_blocks: int, name: str) -> list:
    """Expand an int/str setting to one value per block, as diffusers does for e.g. `attention_head_dim`."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_blocks:
            raise ValueError(f"`{name}` has {len(value)} entries but the model has {num_blocks} blocks.")
        return list(value)
    return [value] * num_blocks
