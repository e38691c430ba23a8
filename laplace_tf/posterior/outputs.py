"""One output of a model with several: the network a posterior is over.

A Functional model with outputs ``[logits, aux]`` (a list or a dict) is viewed as the
Functional model from the same inputs to the selected output; the view shares the
model's layers and weights (nothing is copied), so the posterior covers exactly the
weights that output depends on, and predictions are that output's.
"""

from __future__ import annotations

import keras
from keras.src.models.functional import Functional


def output_names(model: keras.Model) -> list[str]:
    """The names of a Functional model's outputs (the layers that produce them)."""
    return [tensor._keras_history.operation.name for tensor in model.outputs]


def selected_output(model: keras.Model, output: str | int | None) -> keras.Model:
    """``model`` itself (one output, ``output=None``), or the view of ``model`` that
    computes the output named (or numbered) ``output``."""
    outputs = _outputs(model)
    if output is None:
        if outputs is not None and len(outputs) > 1:
            raise ValueError(
                f"the model has {len(outputs)} outputs {output_names(model)}; select the one "
                "the posterior is over with output= (its name or index)."
            )
        return model
    if outputs is None:
        raise ValueError(
            "output= selects an output of a Functional model; this model's outputs cannot "
            "be seen (a subclassed model): return the wanted output from a wrapper model."
        )
    names = output_names(model)
    if isinstance(output, bool) or not isinstance(output, int | str):
        raise TypeError(f"output must be an output name or index; got {output!r}.")
    if isinstance(output, int):
        if not -len(outputs) <= output < len(outputs):
            raise ValueError(f"output={output} is out of range: the model has {len(outputs)}.")
        index = output % len(outputs)
    elif output in names:
        index = names.index(output)
    else:
        raise ValueError(f"the model has no output {output!r}; its outputs are {names}.")
    if len(outputs) == 1:
        return model
    return keras.Model(model.input, outputs[index], name=f"{model.name}_{names[index]}")


def _outputs(model: keras.Model) -> list | None:
    """The output tensors of a Functional / Sequential model; ``None`` for a subclassed one
    (whose ``outputs``, if any, are its own attribute)."""
    if not isinstance(model, Functional | keras.Sequential):
        return None
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    return list(outputs) if isinstance(outputs, list | tuple) and outputs else None
