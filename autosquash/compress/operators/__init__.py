"""The compression operators, one module each, in the order their fields appear in plans and search spaces.

Adding an operator: write `operators/<name>.py` with an `OPERATOR` (a `Form` or a `Pruning`, see base.py)
and add its module name to OPERATOR_MODULES. Plans, search spaces, apply, the cost model, the sensitivity
model and the torch-format writer and reader take it from here.
"""

from __future__ import annotations

import importlib

from autosquash.compress.operators.base import Form, LinearDeploy, Operator, Pruning

OPERATOR_MODULES = ("quant", "ffn_prune", "kv_prune", "svd", "kron")

REGISTRY: tuple[Operator, ...] = tuple(importlib.import_module(f"{__name__}.{m}").OPERATOR for m in OPERATOR_MODULES)
FIELDS = tuple(f for op in REGISTRY for f in op.fields)
SEARCHED_FIELDS = tuple(f.name for f in FIELDS if f.searched)
FORMS: tuple[Form, ...] = tuple(op for op in REGISTRY if isinstance(op, Form))
(PLAIN,) = (f for f in FORMS if f.plain)
DECOMPOSITIONS: tuple[Form, ...] = tuple(f for f in FORMS if not f.plain)
PRUNING: dict[str, Pruning] = {op.kind: op for op in REGISTRY if isinstance(op, Pruning)}


def form(name: str) -> Form:
    """The form called `name`."""
    for f in FORMS:
        if f.name == name:
            return f
    raise KeyError(name)


def deploy_linear(name: str, out_features: int, in_features: int, choice) -> LinearDeploy:
    """What linear `name` (e.g. 'blk.3.attn_q') of (out, in) deploys under `choice`: the first decomposition
    that applies (and saves storage), else one quantized matrix; every tensor in its legal GGUF type."""
    quant = choice.quant_for(name.rsplit(".", 1)[-1])
    for f in DECOMPOSITIONS:
        size = f.size(out_features, in_features, choice)
        if size:
            return LinearDeploy(f, size, tuple(f.tensors(name, out_features, in_features, quant, size)))
    return LinearDeploy(PLAIN, 0, tuple(PLAIN.tensors(name, out_features, in_features, quant, 0)))
