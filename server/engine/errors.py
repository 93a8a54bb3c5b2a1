"""The engine's one error, and the checks of a loaded model that raise it: framework-free, so
that every backend refuses the same models with the same words."""


class ModelError(ValueError):
    """The model cannot be served (unreadable, unsupported, ambiguous)."""


def row_shapes(model) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A loaded Keras model's per-row input and output shapes, X and Y of a map from [n, *X] to
    [n, *Y]; ModelError for any other model (on every backend, the same message)."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(
            f"model must have one input and one output, has {len(model.inputs)} "
            f"and {len(model.outputs)}"
        )
    in_shape, out_shape = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)
    if None in in_shape[1:] or None in out_shape[1:] or len(in_shape) < 2:
        raise ModelError(
            f"model must map [n, *X] to [n, *Y] with fixed X and Y; its input is {in_shape}, "
            f"its output {out_shape}"
        )
    return tuple(int(d) for d in in_shape[1:]), tuple(int(d) for d in out_shape[1:])
