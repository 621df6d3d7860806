"""Views of a model with some submodules wrapped, sharing every parameter: how the fast path's tricks (ToMe, T-GATE)
change a forward without touching the parity model's module tree."""
import copy
from collections.abc import Callable

from torch import nn


def view_with(module: nn.Module, wrap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """`module` with every submodule for which `wrap` returns a replacement replaced by it (searched top-down; a
    replaced submodule is not searched further). Modules along the way are shallow copies with their own child
    dict, so the original tree is unchanged; untouched branches are the original modules."""
    replacement = wrap(module)
    if replacement is not None:
        return replacement
    children = {name: view_with(child, wrap) for name, child in module.named_children()}
    if all(children[name] is child for name, child in module.named_children()):
        return module
    clone = copy.copy(module)
    clone._modules = {**module._modules, **children}  # copy.copy shared the dict; the original keeps its own
    return clone
