"""Model weights as one flat array per dtype in Flower messages.

Flower sends every array of an ArrayRecord as separate objects, and a SuperNode pulls a
message's objects two at a time over HTTP: a model with a hundred tensors then takes
seconds to arrive, however small it is. Packing the weights into one vector per dtype
makes a message a handful of objects. Aggregation is unchanged: FedAvg, FedProx and
FedAdam work element by element. The layout (names, shapes, dtypes, in order) travels in
the message's config as JSON.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ArrayRecord


def layout_of(state: dict[str, torch.Tensor]) -> str:
    """The JSON layout of a state dict: [[name, shape, dtype], ...] in order."""
    return json.dumps([[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in state.items()])


def pack(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """One flat numpy array per dtype, tensors concatenated in state-dict order."""
    groups: dict[str, list[np.ndarray]] = {}
    for v in state.values():
        a = v.detach().cpu().numpy()
        groups.setdefault(str(a.dtype), []).append(a.ravel())
    return ArrayRecord({f"flat-{d}": torch.from_numpy(np.concatenate(parts)) for d, parts in groups.items()})


def unpack(record: ArrayRecord, layout: str) -> dict[str, torch.Tensor]:
    """Invert `pack` with the layout; a record that does not fit the layout is an error."""
    flats = {k[len("flat-"):]: v.numpy() for k, v in record.items()}
    offsets = dict.fromkeys(flats, 0)
    out: dict[str, torch.Tensor] = {}
    for name, shape, dtype in json.loads(layout):
        d = _np_dtype(dtype)
        n = int(np.prod(shape)) if shape else 1
        if d not in flats or offsets[d] + n > flats[d].size:
            raise ValueError(f"model weights do not match the study's layout at {name!r}")
        out[name] = torch.from_numpy(flats[d][offsets[d]:offsets[d] + n].reshape(shape).copy())
        offsets[d] += n
    if any(offsets[d] != flats[d].size for d in flats):
        raise ValueError("model weights hold more values than the study's layout")
    return out


def _np_dtype(torch_dtype: str) -> str:
    return str(torch.empty(0, dtype=getattr(torch, torch_dtype)).numpy().dtype)
