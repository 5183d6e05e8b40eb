"""Small helpers on torch modules, shared by the model builders (imports no torch itself)."""

from __future__ import annotations


def set_tensor(root, dotted: str, value) -> None:
    """Put VALUE at the dotted name under ROOT: as a parameter, as a buffer, or as a plain attribute,
    whichever the name is (without nn.Module.__setattr__'s checks, so a meta tensor can be replaced)."""
    import torch

    owner_name, _, attr = dotted.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if isinstance(value, torch.nn.Parameter):
        owner._parameters[attr] = value
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)
