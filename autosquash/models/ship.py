"""A model that travels to Ray workers without copies: its tensors pickle as numpy arrays.

Pickling a torch module serialises every tensor through in-band bytes: the sender holds the model, its
pickle and a buffer of it, the receiver the bytes and the model built from them (about 4x the weights at
the peak, measured at 1.1B parameters). Numpy arrays pickle out of band (protocol 5), which Ray's object
store keeps once per node and hands to every worker there without a copy. `Shipped(model)` pickles as the
module's skeleton (its tensors on the meta device) plus one array per distinct tensor; unpickling puts
the arrays back where they were, tied weights tied.

The arrays a worker receives from the object store are read-only shared memory: nothing may write into
the shipped model in place (the trials copy what they change; moving it to another device or dtype
copies it too).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch

_AS_INT = {torch.bfloat16: torch.int16}  # dtypes numpy lacks travel as same-width integers


class Shipped:
    """Pickles `model` as its skeleton and numpy arrays; unpickles as the module itself."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __reduce__(self):
        return (_unship, _ship(self.model))


def _array(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    return t.view(_AS_INT[t.dtype]).numpy() if t.dtype in _AS_INT else t.numpy()


def _ship(model: torch.nn.Module) -> tuple:
    tensors: list[torch.Tensor] = []
    index: dict[int, int] = {}
    slots = []  # (module path, "p" | "b", attribute, tensor index, requires_grad)
    for path, module in model.named_modules():
        for kind, table in (("p", module._parameters), ("b", module._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) not in index:
                    index[id(t)] = len(tensors)
                    tensors.append(t)
                slots.append((path, kind, name, index[id(t)], t.requires_grad))
    memo = {}
    for t in tensors:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    skeleton = copy.deepcopy(model, memo)
    return skeleton, [_array(t) for t in tensors], [t.dtype for t in tensors], slots


def _unship(skeleton: torch.nn.Module, arrays: list, dtypes: list, slots: list) -> torch.nn.Module:
    with warnings.catch_warnings():  # object-store arrays are read-only; see the module's note
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensors = [torch.from_numpy(a).view(dt) for a, dt in zip(arrays, dtypes, strict=True)]
    params: dict[int, torch.nn.Parameter] = {}
    for path, kind, name, i, requires_grad in slots:
        module = skeleton.get_submodule(path)
        if kind == "b":
            module._buffers[name] = tensors[i]
        else:
            if i not in params:
                params[i] = torch.nn.Parameter(tensors[i], requires_grad=requires_grad)
            module._parameters[name] = params[i]
    return skeleton
