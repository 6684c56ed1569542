"""Reading and writing parameters of modules that Accelerate dispatched, offloaded or not.

Accelerate keeps an offloaded module's parameters on the ``meta`` device between forward passes; the real
values live in the ``weights_map`` of the module's ``AlignDevicesHook``: a dict of CPU tensors (CPU offload)
or an ``OffloadedWeightsLoader`` that reads memory-mapped ``.dat`` files or the original safetensors
checkpoint (disk offload). This module is the only place that knows that.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

try:  # accelerate is a dependency, but keep plain models working if it is absent.
    from accelerate.hooks import AlignDevicesHook, SequentialHook
    from accelerate.utils import OffloadedWeightsLoader, offload_weight
except ImportError:  # pragma: no cover
    AlignDevicesHook = SequentialHook = OffloadedWeightsLoader = None  # type: ignore[assignment,misc]
    offload_weight = None  # type: ignore[assignment]


def _align_hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None or AlignDevicesHook is None:
        return []
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _offload_hook(module: nn.Module):
    for hook in _align_hooks(module):
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            return hook
    return None


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its Accelerate execution device, else where its weight is."""
    for hook in _align_hooks(module):
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    for param in module.parameters(recurse=True):
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids must go: the device its input embeddings compute on.

    For an embedding offloaded without a hook of its own (its weight on ``meta``), the first Accelerate
    execution device found in the model.
    """
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if _align_hooks(embeddings) or (weight is not None and weight.device.type != "meta"):
        return execution_device(embeddings)
    for module in model.modules():
        for hook in _align_hooks(module):
            if getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
    return torch.device("cpu")


def read_parameter(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The real values of ``module.<name>`` (a detached tensor, possibly read from the offload store)."""
    param = getattr(module, name)
    if param.device.type != "meta":
        return param.detach()
    hook = _offload_hook(module)
    if hook is None:
        raise RuntimeError(
            f"{type(module).__name__}.{name} is on the meta device and no Accelerate offload hook holds its "
            "values: the model was not fully loaded"
        )
    return hook.weights_map[name].detach()


def _own_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(full name, owning module, local name, parameter) of every parameter, shared ones once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{module_name}.{local}" if module_name else local), module, local, param


def _offloaded_value(module: nn.Module, name: str) -> torch.Tensor | None:
    hook = _offload_hook(module)
    if hook is None:
        return None
    try:
        return hook.weights_map[name].detach()
    except KeyError:
        return None


def unloaded_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters on the ``meta`` device whose values nothing holds (not offloaded)."""
    return [
        full
        for full, module, local, param in _own_parameters(model)
        if param.device.type == "meta" and _offloaded_value(module, local) is None
    ]


def iter_parameter_values(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, values)`` of every parameter of ``model``, offloaded ones read from where they live (one at
    a time); parameters whose values nothing holds are skipped (see :func:`unloaded_parameters`)."""
    for full, module, local, param in _own_parameters(model):
        value = param.detach() if param.device.type != "meta" else _offloaded_value(module, local)
        if value is not None:
            yield full, value


def write_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the values of ``module.<name>`` wherever they really live, keeping dtype and shape.

    For disk offload the new values are written as a fresh ``.dat`` file in the offload folder and the index
    updated, so the user's original checkpoint files are never modified.
    """
    param = getattr(module, name)
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"new {name} has shape {tuple(value.shape)}, the module has {tuple(param.shape)}")
    if param.device.type != "meta":
        with torch.no_grad():
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))
        return
    hook = _offload_hook(module)
    if hook is None:
        raise RuntimeError(f"cannot write {type(module).__name__}.{name}: it is on meta with no offload hook")
    weights_map = hook.weights_map
    key = weights_map.prefix + name
    store = weights_map.dataset
    if OffloadedWeightsLoader is not None and isinstance(store, OffloadedWeightsLoader):
        if key in store.state_dict:
            _copy_into(store.state_dict, key, value)
        elif store.save_folder is not None:
            dtype = _stored_dtype(store.index.get(key, {}), param.dtype)
            offload_weight(value.detach().to("cpu", dtype), key, store.save_folder, index=store.index)
        else:
            store.state_dict[key] = value.detach().to("cpu", param.dtype)
    elif isinstance(store, dict):
        _copy_into(store, key, value)
    else:
        raise RuntimeError(f"unsupported Accelerate weights map {type(store).__name__} for {key}")


def _copy_into(store: dict, key: str, value: torch.Tensor) -> None:
    current = store[key]
    if isinstance(current, torch.Tensor) and current.shape == value.shape:
        with torch.no_grad():
            current.copy_(value.to(device=current.device, dtype=current.dtype))
    else:
        store[key] = value.detach().cpu()


def _stored_dtype(entry: dict, default: torch.dtype) -> torch.dtype:
    name = entry.get("dtype")
    if not name:
        return default
    return getattr(torch, str(name).replace("torch.", ""), default)


def offload_source_folders(model: nn.Module) -> set[str]:
    """Folders that an Accelerate-offloaded ``model`` still reads weights from lazily: its offload folder and
    the checkpoint folder whose safetensors files it maps. Saving must not replace files in them."""
    folders: set[str] = set()
    for module in model.modules():
        hook = _offload_hook(module)
        store = getattr(getattr(hook, "weights_map", None), "dataset", None)
        if OffloadedWeightsLoader is None or not isinstance(store, OffloadedWeightsLoader):
            continue
        if store.save_folder is not None:
            folders.add(os.path.abspath(store.save_folder))
        for entry in (store.index or {}).values():
            if isinstance(entry, dict) and entry.get("safetensors_file"):
                folders.add(os.path.dirname(os.path.abspath(entry["safetensors_file"])))
    return folders
