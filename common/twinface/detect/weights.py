"""The MTCNN weights' one check, shared by both twins: every tensor present, none extra, each of the net's shape.

Both twins load the same numpy state dicts in torch layout (twinface.fixtures.mtcnn_state_dicts()); checking here,
before any framework sees a tensor, gives one line naming the tensor and both shapes rather than torch's
multi-line report or a bare numpy reshape error from a layout conversion.
"""
import numpy as np


def check_state(expected: dict, state: dict, source: str) -> None:
    """`expected`: {tensor name: shape} of the built net; `state`: {tensor name: array} to load into it."""
    missing = [name for name in expected if name not in state]
    if missing:
        raise ValueError(f"{source}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    extra = [name for name in state if name not in expected]
    if extra:
        raise ValueError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} in all) for this net")
    for name, shape in expected.items():
        given = tuple(np.shape(state[name]))
        if given != tuple(shape):
            raise ValueError(f"{source}: tensor '{name}' has shape {given}, the net expects {tuple(shape)}")
