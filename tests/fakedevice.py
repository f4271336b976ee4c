"""A second device on a CPU-only machine, for device-placement tests.

``FakeDevices()`` is a dispatch mode under which tensors can live on ``FAKE`` (``cpu:1``): they are
wrappers around CPU tensors whose ``.device`` says ``cpu:1``. Like a real accelerator it refuses to mix
devices in one op ("Expected all tensors to be on the same device"), allowing only what CUDA allows:
CPU scalars (0-dim), CPU index tensors in indexing, and cross-device copies (``.to``, ``copy_``).
Factories with ``device=FAKE`` create fake tensors, ``.to(FAKE)`` / ``.cpu()`` move. Autograd works
(the wrapper sits above autograd, like DTensor).

``to_device(module, FAKE)`` moves a module's parameters and buffers there; ``shard(model, plan)`` places
sub-modules on devices and makes each one move its inputs to its device, as accelerate's ``device_map``
hooks do (forward wrapped per instance; user pre-hooks still see the un-moved inputs).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("cpu", 1)
CPU = torch.device("cpu")
_aten = torch.ops.aten
_MIXING = {_aten._to_copy.default, _aten.copy_.default, _aten._local_scalar_dense.default,
           _aten.lift_fresh.default, _aten.detach.default}
_INDEXING = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default,
             _aten._index_put_impl_.default}


class OnFake(torch.Tensor):
    """A CPU tensor that says it lives on ``FAKE`` (made under ``FakeDevices``; ops on it work anywhere)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                device=FAKE, requires_grad=requires_grad)
        r.elem = elem
        return r

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"OnFake({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # reached with no mode on this thread (e.g. autograd's device thread runs a tensor hook)
        return _dispatch(func, args, kwargs or {})


def _device(t: torch.Tensor) -> torch.device:
    return FAKE if isinstance(t, OnFake) else t.device


class _DataFactories(TorchFunctionMode):
    """``torch.tensor(data, device=FAKE)`` (and as_tensor / asarray) build on CPU below the dispatcher's
    reach: build without the device, then move."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], OnFake):
            return args[0].elem.tolist()
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and kwargs.get("device") is not None:
            device = torch.device(kwargs.pop("device"))
            return func(*args, **kwargs).to(device)
        return func(*args, **kwargs)


class FakeDevices(TorchDispatchMode):
    """Dispatch mode that runs ops on CPU while enforcing accelerator device rules for ``FAKE``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self._factories = _DataFactories()

    def __enter__(self):
        # Module.to(FAKE) must swap parameters (a wrapper cannot be shallow-copied into a CPU parameter)
        self._swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._factories.__exit__(*exc)
            torch.__future__.set_swap_module_params_on_conversion(self._swap)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return _dispatch(func, args, kwargs or {})


def _dispatch(func, args, kwargs):
    """Run ``func`` on the CPU tensors behind the wrappers, refusing mixed devices as CUDA does."""
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    if func in _INDEXING:
        self_dev = _device(args[0])
        devices = {self_dev} | {_device(t) for t in tensors[1:] if _device(t) != CPU}
    else:
        devices = {_device(t) for t in tensors if isinstance(t, OnFake) or t.dim() > 0}
    if func not in _MIXING and len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                           f"devices, {names}! (in {func})")
    target = kwargs.get("device")
    if func is _aten._to_copy.default:
        out_dev = torch.device(target) if target is not None else _device(args[0])
    elif func is _aten.copy_.default:
        out_dev = _device(args[0])
    elif target is not None:
        out_dev = torch.device(target)
    elif func in _INDEXING:
        out_dev = _device(args[0])
    elif devices:
        out_dev = FAKE if FAKE in devices else next(iter(devices))
    else:
        out_dev = FAKE if any(isinstance(t, OnFake) for t in tensors) else CPU
    wrappers = {id(t.elem): t for t in tensors if isinstance(t, OnFake)}
    unwrap = functools.partial(tree_map, lambda t: t.elem if isinstance(t, OnFake) else t)
    args, kwargs = unwrap(args), unwrap(kwargs)
    if "device" in kwargs and kwargs["device"] is not None and torch.device(kwargs["device"]) == FAKE:
        kwargs["device"] = CPU
    out = func(*args, **kwargs)
    if out_dev != FAKE:
        return out

    def wrap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        known = wrappers.get(id(t))
        return OnFake(t) if known is None else known

    return tree_map(wrap, out)


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """Move ``module``'s parameters and buffers to ``device`` (FAKE or CPU); call under FakeDevices."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.to(device)
    return module


def _move(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_move(v, device) for v in x)
    return x


def shard(model: nn.Module, plan: dict[nn.Module, torch.device], output_device: torch.device = CPU) -> None:
    """accelerate-style placement: each module in ``plan`` moves to its device and moves its inputs there
    (its forward is wrapped per instance); ``model``'s tensor outputs come back on ``output_device``
    (accelerate's ``io_same_device`` on the top module). Call under FakeDevices."""
    for module, device in plan.items():
        to_device(module, device)
        inner = module.forward

        def forward(*args, _inner=inner, _dev=device, **kwargs):
            return _inner(*_move(args, _dev), **{k: _move(v, _dev) for k, v in kwargs.items()})

        module.forward = forward
    top = model.forward

    def top_forward(*args, **kwargs):
        out = top(*args, **kwargs)
        for key, value in list(out.items()):
            if isinstance(value, torch.Tensor):
                out[key] = value.to(output_device)
        return out

    model.forward = top_forward
