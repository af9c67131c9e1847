"""Checks that the batch sizes, the model and the data fit together, run on every rank before any process group
(how sequences split over the layout is :meth:`ParallelConfig.check_sequence_length`'s).

Each failure is a :class:`~lightning_megatron.errors.UserError` naming the option to change, where the run would
otherwise stop mid-step with an ``IndexError`` or a ``ZeroDivisionError`` (or hang, when only some ranks fail).
"""

from __future__ import annotations

from typing import Any

from lightning_megatron.errors import UserError

_SEQUENCE_FIELDS = (("seq_length", "seq_length"), ("seq_length", "encoder_seq_length"),
                    ("decoder_seq_length", "decoder_seq_length"))
"""(datamodule attribute, model config field) pairs: the data's sequences must fit the model's."""


def check_batch_sizes(global_batch_size: int, micro_batch_size: int) -> None:
    """Both sizes positive, and the global batch a whole number of micro batches."""
    for name, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size)):
        if value < 1:
            raise UserError(f"the datamodule's {name}={value} must be at least 1; set data {name} to a positive "
                            f"number of sequences")
    if global_batch_size % micro_batch_size:
        raise UserError(f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size="
                        f"{micro_batch_size}; choose a global batch that is a whole number of micro batches")


def check_model_fits_data(module: Any, datamodule: Any) -> None:
    """The tokenizer's ids fit the model's vocabulary and the data's sequences fit the model's sequence length."""
    config = getattr(module, "config", None)
    if config is None or datamodule is None:
        return
    tokenizer = getattr(datamodule, "tokenizer", None)
    vocab_size = getattr(config, "vocab_size", None)
    if tokenizer is not None and vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"the model's vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} token ids; "
            f"set the model config's vocab_size (model.config.vocab_size) to at least {tokenizer.vocab_size}"
        )
    for data_field, model_field in _SEQUENCE_FIELDS:
        data_length, model_length = getattr(datamodule, data_field, None), getattr(config, model_field, None)
        if isinstance(data_length, int) and isinstance(model_length, int) and data_length > model_length:
            raise UserError(
                f"the data's {data_field}={data_length} is longer than the model's {model_field}={model_length}; "
                f"set data {data_field} to at most {model_length}, or model.config.{model_field} to at least "
                f"{data_length}"
            )
