"""k copies of one ``nn.Module`` held as stacked tensors, and calls of its methods per copy.

:class:`StackedMembers` keeps the parameters and buffers of k members of the same architecture
stacked on a new leading dimension of size k (member ``i`` is slice ``i``). A method of the
template module (``training_step``, ``validation_step``, ``forward``...) runs for every member
in one of two ways:

* **vectorized** (:meth:`StackedMembers.vmap_call`): ``torch.func.vmap`` over (parameters,
  buffers, inputs) of ``torch.func.functional_call`` — one batched kernel per op for all k
  members, with ``randomness="different"`` (each member draws its own dropout masks).
  In-place buffer updates (BatchNorm running statistics) land in each member's own slice.
* **looped** (:meth:`StackedMembers.call`): ``functional_call`` with member ``i``'s slices, one
  member after another. Each member draws from its own torch RNG stream, so dropout masks are
  the ones the member would draw if it trained alone with its seed; submodules that are
  torchmetrics ``Metric`` objects are swapped for member ``i``'s own copy, and so are the
  template's plain attributes when the members keep their own (:attr:`StackedMembers.member_attributes`).

Both give every parameter slice exactly the gradient member ``i`` would get alone, except where torch's vmap rules
are wrong (:func:`vmap_miscomputes` names the known case, whose training steps then run looped).

Convolution weights (4-D per member) can be laid out channels-last in every member's slice
(:meth:`StackedMembers.set_channels_last`): oneDNN's CPU convolutions then run channels-last,
1.5x faster per step for the benchmark's small CNN; the values are the same (the numerics of
the convolution kernels differ at float rounding). A template whose 4-D weights are
channels-last (``module.to(memory_format=torch.channels_last)``) is stacked that way. Calls of
``self.log``/``self.log_dict`` inside the method are captured (:func:`capture_logs`) so that
the caller can log each member's values under its own name.

:meth:`StackedMembers.as_member` makes the template member ``i`` for a block of code that is not
a step (a hook, a callback): member ``i``'s slices (and their gradients) in place of its
parameters and buffers, its metric copies, attributes and RNG stream.

Plain torch (and torchmetrics' ``Metric`` type): no Lightning, no Ray.
"""

from __future__ import annotations

import copy
import numbers
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torchmetrics import Metric

__all__ = ["CapturedLogs", "HostRNG", "StackedMembers", "UnloggableValue", "capture_logs", "host_rng", "loss_of", "set_host_rng", "vmap_miscomputes"]


class UnloggableValue(ValueError):
    """Your step logged a value Lightning cannot log (a string, a dict): an error of your code, not one vmap's loop avoids."""


@dataclass
class CapturedLogs:
    """What one call of a member method logged: names with their keyword arguments, and the values."""

    names: list[str] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    def record(self, name: str, value: Any, **kwargs: Any) -> None:
        if name in self.names:
            raise ValueError(f"`self.log({name!r}, ...)` was called twice in one step")
        if not isinstance(value, (Tensor, Metric, numbers.Number)):  # Lightning's own check, which would come after vmap
            raise UnloggableValue(f"`self.log({name!r}, ...)` was called, but `{type(value).__name__}` values cannot be logged (log a number, a tensor or a torchmetrics Metric)")
        self.names.append(name)
        self.kwargs.append(kwargs)
        self.values.append(value if isinstance(value, (Tensor, Metric)) else torch.tensor(float(value)))

    def record_dict(self, dictionary: Mapping[str, Any], **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self.record(name, value, **kwargs)


@contextmanager
def capture_logs(module: nn.Module) -> Iterator[CapturedLogs]:
    """Replaces ``module.log``/``module.log_dict`` by recorders while the block runs."""
    logs = CapturedLogs()
    module.log = logs.record  # type: ignore[method-assign]
    module.log_dict = logs.record_dict  # type: ignore[method-assign]
    try:
        yield logs
    finally:
        del module.log
        del module.log_dict


class _MethodCaller(nn.Module):
    """Lets ``functional_call`` run any method of ``module`` (it only calls ``forward``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        out = getattr(self.module, method)(*args, **kwargs)
        #: the module's buffers as the call left them: your code may rebind one (``self.ema = 0.9 * self.ema + ...``),
        #: which ``functional_call`` would drop when it puts the originals back
        self.last_buffers = dict(self.module.named_buffers(remove_duplicate=False))
        return out


#: numpy's and Python's global random states, as ``np.random.get_state()`` and ``random.getstate()`` give them
HostRNG = tuple[Any, Any]


def host_rng() -> HostRNG:
    """numpy's and Python's global random states now."""
    return np.random.get_state(), random.getstate()


def set_host_rng(state: HostRNG) -> None:
    np.random.set_state(state[0])
    random.setstate(state[1])


class StackedMembers(nn.Module):
    """The parameters and buffers of ``members`` stacked on dimension 0, callable per member.

    Args:
        template: a module of the members' architecture whose methods are run (its own
            parameter and buffer values are never used; it is not a submodule of this one).
        members: k modules with ``template``'s parameter and buffer names and shapes.
        rng_states: per member, the torch CPU RNG state its looped calls start from (default:
            copies of the current state).
        host_rng_states: per member, numpy's and Python's random states (:func:`host_rng`) its looped
            calls start from (default: the current ones).
    """

    def __init__(
        self, template: nn.Module, members: Sequence[nn.Module], rng_states: Sequence[Tensor] | None = None, host_rng_states: Sequence[HostRNG] | None = None
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("StackedMembers needs at least one member")
        object.__setattr__(self, "template", template)
        object.__setattr__(self, "_caller", _MethodCaller(template))
        self.num_members = len(members)
        self.param_names = [name for name, _ in template.named_parameters()]
        self.buffer_names = [name for name, _ in template.named_buffers()]
        self.params = nn.ParameterList()
        for name in self.param_names:
            slices = [dict(m.named_parameters())[name] for m in members]
            self.params.append(nn.Parameter(torch.stack([s.detach() for s in slices]).clone(), requires_grad=slices[0].requires_grad))
        #: per parameter, whether each member trains it (``requires_grad`` as its hooks set it, see :meth:`as_member`)
        self.member_requires_grad = [[p.requires_grad] * self.num_members for p in self.params]
        #: whether a member's hook changed what it trains since :meth:`settle_requires_grad` last ran
        self.requires_grad_changed = False
        #: whether the members' 4-D parameters are laid out channels-last (as the template's are)
        self.channels_last = False
        self.set_channels_last(any(_is_channels_last(p) for p in template.parameters()))
        for j, name in enumerate(self.buffer_names):
            self.register_buffer(f"buffer_{j}", torch.stack([dict(m.named_buffers())[name] for m in members]).clone())
        # every state_dict key of the template (tied parameters and buffers appear under each of their names)
        first = {id(t): n for n, t in [*template.named_parameters(), *template.named_buffers()]}
        #: per stacked name, every name the template holds that tensor under (a decoder weight tied to an embedding)
        self.aliases: dict[str, list[str]] = {}
        self._state_keys = {}
        for kind, names, named in (("param", self.param_names, template.named_parameters), ("buffer", self.buffer_names, template.named_buffers)):
            for name, tensor in named(remove_duplicate=False):
                self.aliases.setdefault(first[id(tensor)], []).append(name)
                self._state_keys[name] = (kind, names.index(first[id(tensor)]))
        self.state_keys = [k for k in template.state_dict() if k in self._state_keys]
        # torchmetrics objects hold state outside parameters and buffers: one copy per member
        self.metric_paths = [path for path, sub in template.named_modules() if isinstance(sub, Metric) and path]
        self.metrics = nn.ModuleList(
            nn.ModuleList(copy.deepcopy(template.get_submodule(path)) for path in self.metric_paths) for _ in range(self.num_members)
        )
        states = list(rng_states) if rng_states is not None else [torch.get_rng_state() for _ in members]
        self.rng_states = [s.clone() for s in states]
        self.cuda_rng_states: list[Tensor | None] = [None] * self.num_members
        self.host_rng_states = list(host_rng_states) if host_rng_states is not None else [host_rng() for _ in members]
        self._scratch_metrics: list[nn.Module] | None = None
        #: per member, its own values of the template's plain attributes (``None``: the members share the template's)
        self.member_attributes: list[dict[str, Any]] | None = None
        #: per member, the parameters :meth:`as_member` gives it every time, with their own gradients (``None``: fresh
        #: views each time, their gradients slices of the stacked ones; see :meth:`keep_member_parameters`)
        self.member_parameters: list[list[nn.Parameter]] | None = None

    # ----------------------------------------------------------------- state
    def stacked(self, key: str) -> Tensor:
        """The stacked tensor of ``template.state_dict()`` entry ``key``."""
        kind, j = self._state_keys[key]
        return self.params[j] if kind == "param" else getattr(self, f"buffer_{j}")

    def member_state_dict(self, index: int) -> dict[str, Tensor]:
        """Member ``index``'s ``state_dict`` under the template's keys (views of the stacked tensors)."""
        return {key: self.stacked(key)[index].detach() for key in self.state_keys}

    def member_buffers(self, index: int, saved: bool) -> dict[str, Tensor]:
        """Member ``index``'s buffers that the template's ``state_dict`` holds (``saved``) or leaves out (non-persistent ones)."""
        return {name: self.stacked(name)[index].detach() for name in self.buffer_names if (name in self.state_keys) == saved}

    def load_member_state_dict(self, index: int, state: Mapping[str, Tensor]) -> None:
        """Copies ``state`` (the template's keys) into member ``index``'s slices.

        Raises:
            KeyError: naming the keys ``state`` lacks.
            RuntimeError: naming the entries whose shapes differ from the member's, as ``load_state_dict`` does.
        """
        missing = [k for k in self.state_keys if k not in state]
        if missing:
            raise KeyError(f"member {index}'s state lacks {missing[:5]} of your module's keys (a checkpoint of another module?)")
        mismatched = [
            f"size mismatch for {key}: copying a param with shape {tuple(torch.as_tensor(state[key]).shape)}, the shape in the current model is {tuple(self.stacked(key).shape[1:])}"
            for key in self.state_keys
            if tuple(torch.as_tensor(state[key]).shape) != tuple(self.stacked(key).shape[1:])
        ]
        if mismatched:
            raise RuntimeError(f"Error(s) in loading member {index}'s state_dict:\n\t" + "\n\t".join(mismatched))
        with torch.no_grad():
            for key in self.state_keys:
                self.stacked(key)[index].copy_(torch.as_tensor(state[key]))

    @property
    def has_convolutions(self) -> bool:
        """Whether the members have 4-D parameters (convolution weights), which a memory layout applies to."""
        return any(p.dim() == 5 for p in self.params)

    def set_channels_last(self, enabled: bool, optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
        """Lays every member's 4-D parameters out channels-last (``enabled``) or contiguous, values unchanged.

        The parameters stay the same objects (their gradients and the per-parameter state of
        ``optimizers``, such as momentum, are laid out alike), so optimizers keep stepping them.
        """
        self.channels_last = enabled and self.has_convolutions
        for param in self.params:
            if param.dim() != 5:
                continue
            param.data = _laid_out(param.data, self.channels_last)
            if param.grad is not None:
                param.grad = _laid_out(param.grad, self.channels_last)
            for optimizer in optimizers:
                state = optimizer.state.get(param, {})
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        state[key] = _laid_out(value, self.channels_last)

    def _named(self, index: int | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = {f"module.{n}": (p if index is None else p[index]) for n, p in zip(self.param_names, self.params)}
        buffers = {f"module.{n}": (getattr(self, f"buffer_{j}") if index is None else getattr(self, f"buffer_{j}")[index]) for j, n in enumerate(self.buffer_names)}
        return params, buffers

    # ----------------------------------------------------------------- calls
    def vmap_call(self, method: str, args: tuple[Any, ...], in_dims: tuple[Any, ...]) -> tuple[Any, CapturedLogs]:
        """Runs ``template.<method>(*args)`` for all members at once with ``torch.func.vmap``.

        ``in_dims`` says per argument which dimension holds the members (``0``) or that it is
        shared (``None``). Returns the stacked result (the loss, or a dict's ``"loss"``) and the
        captured logs with each value stacked over the members.

        Raises whatever vmap raises for code it cannot batch (``.item()``, data-dependent
        control flow, in-place updates of unbatched tensors such as a torchmetrics state).
        """
        params, buffers = self._named()
        names: list[CapturedLogs] = []
        # metrics updated under vmap would keep batched tensors: the call gets stand-in copies, and fails if it updated one
        if self._scratch_metrics is None:
            self._scratch_metrics = [copy.deepcopy(self.template.get_submodule(path)) for path in self.metric_paths]
        scratch = self._scratch_metrics

        def one(p: dict[str, Tensor], b: dict[str, Tensor], *inputs: Any) -> tuple[Any, tuple[Tensor, ...], dict[int, Tensor]]:
            with capture_logs(self.template) as logs:
                out = functional_call(self._caller, (p, b), (method, *inputs))
            if any(isinstance(v, Metric) for v in logs.values):
                raise RuntimeError(f"`{method}` logs a torchmetrics Metric object, which vmap cannot batch")
            names.append(logs)
            loss = loss_of(out, required=method == "training_step")  # (only automatic optimization vmaps)
            return (loss if isinstance(loss, Tensor) else torch.zeros(())), tuple(logs.values), self._rebound(b)

        try:
            with self._swapped_metrics(scratch):
                out, values, rebound = vmap(one, in_dims=(0, 0, *in_dims), randomness="different")(params, buffers, *args)
            self._keep_rebound(rebound)
        finally:
            updated = [path for path, metric in zip(self.metric_paths, scratch) if metric._update_count]
            if updated:
                self._scratch_metrics = None  # they may hold batched tensors now
        if updated:
            raise RuntimeError(f"`{method}` updates the torchmetrics Metric {updated}, which vmap cannot batch")
        logs = names[0]
        logs.values = list(values)
        return out, logs

    def call(self, index: int, method: str, args: tuple[Any, ...]) -> tuple[Any, CapturedLogs]:
        """Runs ``template.<method>(*args)`` for member ``index`` alone (its slices, RNG stream, metric copies and
        attributes); returns the method's output and the captured logs."""
        params, buffers = self._named(index)
        with self.member_rng(index), self._member_metrics(index), self._member_attributes(index), capture_logs(self.template) as logs:
            out = functional_call(self._caller, (params, buffers), (method, *args))
        self._keep_rebound(self._rebound(buffers), index)
        return out, logs

    def _rebound(self, passed: Mapping[str, Tensor]) -> dict[int, Tensor]:
        """The buffers the last call rebound (``self.ema = 0.9 * self.ema + ...``), by position in :attr:`buffer_names`:
        those the template held as another tensor than ``passed`` (what :meth:`_named` gave the call) when it returned."""
        left = self._caller.last_buffers
        rebound = {}
        for j, name in enumerate(self.buffer_names):
            now = next((left[alias] for alias in self.aliases[name] if left.get(alias) is not passed[f"module.{name}"]), None)
            if isinstance(now, Tensor):
                rebound[j] = now
        return rebound

    def _keep_rebound(self, rebound: Mapping[int, Tensor], index: int | None = None) -> None:
        """Writes rebound buffers (:meth:`_rebound`) into the stack: member ``index``'s slice, or every member's (stacked values)."""
        for j, value in rebound.items():
            stacked = getattr(self, f"buffer_{j}")
            _copy_rebound(self.buffer_names[j], stacked if index is None else stacked[index], value)

    @contextmanager
    def as_member(self, index: int, host: bool = False) -> Iterator[nn.Module]:
        """The template as member ``index`` during the block, for code that is not a step (hooks, callbacks).

        Its parameters are member ``index``'s slices (``nn.Parameter`` views: in-place changes
        reach the stack) with the slices of the stacked gradients as ``.grad`` (or, once
        :meth:`keep_member_parameters` ran, the same views every time, with their own ``.grad``); its buffers,
        metrics, attributes and torch RNG stream are the member's (with ``host``, its numpy and Python streams too:
        :meth:`member_rng`). Yields the template.

        A parameter's ``requires_grad`` is the member's own (:attr:`member_requires_grad`): setting it
        in the block (freezing a layer from some epoch on) is kept for the member, and
        :meth:`settle_requires_grad` makes the stack follow it.
        """
        views = self._member_views(index)
        tensors = [(name, "_parameters", view) for name, view in zip(self.param_names, views)]
        tensors += [(name, "_buffers", getattr(self, f"buffer_{j}")[index]) for j, name in enumerate(self.buffer_names)]
        try:
            with self._in_template(tensors), self.member_rng(index, host), self._member_metrics(index), self._member_attributes(index):
                yield self.template
        finally:
            for j, view in enumerate(views):
                if view.requires_grad != self.member_requires_grad[j][index]:
                    self.member_requires_grad[j][index] = view.requires_grad
                    self.requires_grad_changed = True

    def _member_views(self, index: int) -> list[nn.Parameter]:
        """Member ``index``'s parameters for :meth:`as_member`: its kept ones (:meth:`keep_member_parameters`), on the
        stacked storage as it is now, or fresh views whose gradients are slices of the stacked gradients."""
        if self.member_parameters is not None:
            kept = self.member_parameters[index]
            for view, stacked in zip(kept, self.params):
                own = stacked.detach()[index]
                if view.data_ptr() != own.data_ptr() or view.device != own.device:  # the stack moved or was laid out anew
                    view.data = own
            return kept
        views = []
        for j, stacked in enumerate(self.params):
            trains = self.member_requires_grad[j][index]
            view = nn.Parameter(stacked.detach()[index], requires_grad=trains)
            if trains and stacked.grad is not None:
                view.grad = stacked.grad[index]
            views.append(view)
        return views

    def keep_member_parameters(self) -> None:
        """From now on :meth:`as_member` gives each member the same parameters every time: views of its slices (what an
        optimizer steps in place reaches the stack) with gradients of their own, for optimizers of the member's own
        (manual optimization, see :mod:`hqde_lightning.manual_members`)."""
        if self.member_parameters is None:
            self.member_parameters = [
                [nn.Parameter(stacked.detach()[i], requires_grad=self.member_requires_grad[j][i]) for j, stacked in enumerate(self.params)]
                for i in range(self.num_members)
            ]

    def settle_requires_grad(self, active: Sequence[int]) -> None:
        """Each stacked parameter requires a gradient when one of the ``active`` members trains it.

        One that none of them trains gets no gradient, so optimizers leave it, and its state,
        as each member's own fit does. Where only some train it, the others' slices are
        :meth:`held_slices`.
        """
        self.requires_grad_changed = False
        for stacked, flags in zip(self.params, self.member_requires_grad):
            stacked.requires_grad_(any(flags[i] for i in active))

    def held_slices(self, active: Sequence[int]) -> list[tuple[int, list[int]]]:
        """``(parameter, members)``: the ``active`` members that do not train a parameter some others train."""
        held = []
        for j, (stacked, flags) in enumerate(zip(self.params, self.member_requires_grad)):
            members = [i for i in active if not flags[i]]
            if stacked.requires_grad and members:
                held.append((j, members))
        return held

    @contextmanager
    def _member_attributes(self, index: int) -> Iterator[None]:
        """Member ``index``'s own plain attributes on the template during the block (kept for it afterwards, rebound or not)."""
        if self.member_attributes is None:
            yield
            return
        own, attributes = self.member_attributes[index], self.template.__dict__
        outer = {name: attributes.get(name, _ABSENT) for name in own}
        before = set(attributes)
        attributes.update(own)
        try:
            yield
        finally:
            for name in set(attributes) - before - set(own):  # set by the member for the first time: its own too
                outer[name] = _ABSENT
            for name, value in outer.items():
                own[name] = attributes.pop(name, _ABSENT)
                if value is not _ABSENT:
                    attributes[name] = value
            for name in [n for n, v in own.items() if v is _ABSENT]:  # deleted by the member
                del own[name]

    @contextmanager
    def member_rng(self, index: int, host: bool = False) -> Iterator[None]:
        """Member ``index``'s own torch random stream during the block (CPU, and the current CUDA device's when used), and
        with ``host`` its own numpy and Python global ones too: for its data (what its dataset and batch hooks draw, a
        random augmentation). Swapping those costs about 0.15 ms (numpy's state is read and written whole), more than many
        looped steps of small models, so steps and other hooks draw them from the group's."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        outer, outer_host = torch.get_rng_state(), host_rng() if host else None
        if outer_host is not None:
            set_host_rng(self.host_rng_states[index])
        outer_cuda = torch.cuda.get_rng_state() if cuda else None
        torch.set_rng_state(self.rng_states[index])
        if cuda and self.cuda_rng_states[index] is not None:
            torch.cuda.set_rng_state(self.cuda_rng_states[index])
        elif cuda:  # the member's first CUDA draw: its CUDA stream is seeded from its own CPU stream
            torch.cuda.manual_seed(int(torch.randint(0, 2**62, ()).item()))
        try:
            yield
        finally:
            self.rng_states[index] = torch.get_rng_state()
            if outer_host is not None:
                self.host_rng_states[index] = host_rng()
                set_host_rng(outer_host)
            if cuda:
                self.cuda_rng_states[index] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(outer_cuda)
            torch.set_rng_state(outer)

    def _member_metrics(self, index: int) -> Any:
        """Member ``index``'s copies of the template's torchmetrics submodules in place during the block."""
        return self._swapped_metrics(list(self.metrics[index]))

    @contextmanager
    def _swapped_metrics(self, metrics: Sequence[nn.Module]) -> Iterator[None]:
        """``metrics`` (one per torchmetrics submodule of the template) stand in the template's place during the block."""
        originals = [self.template.get_submodule(path) for path in self.metric_paths]
        for path, metric in zip(self.metric_paths, metrics):
            _set_submodule(self.template, path, metric)
        try:
            yield
        finally:
            for path, metric in zip(self.metric_paths, originals):
                _set_submodule(self.template, path, metric)

    def unstacked(self) -> list[str]:
        """The template's parameters and buffers that are not stacked: those your code added to it after the members were
        stacked (a layer your ``setup`` creates), which every member would share."""
        names = [*self.param_names, *self.buffer_names]
        return [name for name, _ in [*self.template.named_parameters(), *self.template.named_buffers()] if name not in names]

    # ------------------------------------------------------------ optimizers
    @contextmanager
    def swapped_parameters(self) -> Iterator[None]:
        """The stacked parameters stand in the template's place during the block.

        ``template.configure_optimizers()`` called inside builds its optimizer (and parameter
        groups, by name) over the stacked parameters: one optimizer for all members.
        """
        with self._in_template([(name, "_parameters", stacked) for name, stacked in zip(self.param_names, self.params)]):
            yield

    @contextmanager
    def _in_template(self, tensors: Sequence[tuple[str, str, Tensor]]) -> Iterator[None]:
        """Each ``(name, table, tensor)``: ``tensor`` stands as the template's parameter or buffer ``name``
        (``table`` is ``"_parameters"`` or ``"_buffers"``) during the block."""
        originals = []
        for name, table, tensor in tensors:
            for alias in self.aliases.get(name, [name]):  # every name a tied tensor has
                parent, _, leaf = alias.rpartition(".")
                entries = getattr(self.template.get_submodule(parent), table)
                originals.append((name, table, entries, leaf, entries[leaf], tensor))
                entries[leaf] = tensor
        try:
            yield
        finally:
            rebound = {}
            for name, table, entries, leaf, original, tensor in originals:
                if table == "_buffers" and entries[leaf] is not tensor and isinstance(entries[leaf], Tensor):
                    rebound[name] = (tensor, entries[leaf])  # your hook rebound the buffer: the member keeps the new value
                entries[leaf] = original
            for name, (tensor, value) in rebound.items():
                _copy_rebound(name, tensor, value)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> StackedMembers:
        # the template moves with the stack (its non-parameter tensors, its `device`)
        self.template._apply(fn)
        return super()._apply(fn, recurse)


def _copy_rebound(name: str, target: Tensor, value: Tensor) -> None:
    """Copies ``value``, the tensor your code rebound the buffer ``name`` to, into its place in the stack ``target``."""
    if value.shape != target.shape:
        raise RuntimeError(
            f"your code replaced the buffer {name!r} ({tuple(target.shape)} per member) with a tensor of shape {tuple(value.shape)}:"
            " a member group keeps its members' buffers stacked, so a buffer keeps its shape (`vectorize` does not change this)"
        )
    with torch.no_grad():
        target.copy_(value)


#: an attribute the template did not have
_ABSENT = object()


def vmap_miscomputes(module: nn.Module) -> str | None:
    """Why ``torch.func.vmap`` over stacked members would compute ``module``'s gradients wrong, or ``None``.

    The known case: an ``nn.Embedding`` with a ``padding_idx``. With its weight and its indices both batched, torch's
    vmap rule for the embedding's backward pass leaves only the first member's padding row without a gradient, so the
    other members would train theirs. Its forward pass is right.
    """
    padded = [path for path, sub in module.named_modules() if isinstance(sub, nn.Embedding) and sub.padding_idx is not None]
    if not padded:
        return None
    return f"the nn.Embedding {padded} have a `padding_idx`, whose row torch.func.vmap's backward pass keeps at 0 for the first member only"


def loss_of(out: Any, required: bool = False) -> Any:
    """The loss of a step's output: the output itself, or its ``"loss"`` entry (``None`` without one: a ``validation_step``
    may return any dict).

    Raises:
        MisconfigurationException: with ``required`` (``training_step`` under automatic optimization), for a dict without
            ``"loss"``, as Lightning raises it for a plain fit.
    """
    if not isinstance(out, Mapping):
        return out
    if "loss" not in out and required:
        raise MisconfigurationException("In automatic_optimization, when `training_step` returns a dict, the 'loss' key needs to be present")
    return out.get("loss")


def _is_channels_last(tensor: Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (and not also contiguous, as when its channels or pixels are one)."""
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def _laid_out(stacked: Tensor, channels_last: bool) -> Tensor:
    """A stack of 4-D tensors (``k, out, in, h, w``) whose member slices are channels-last or contiguous.

    Already laid out that way: ``stacked`` itself, else a copy. ``memory_format`` has no 5-D
    layout whose slices are channels-last, so the stack is stored as ``k, out, h, w, in`` and
    viewed back in the members' dimension order.
    """
    if not channels_last:
        return stacked.contiguous()
    k, out, channels, height, width = stacked.shape
    strides = (out * height * width * channels, height * width * channels, 1, width * channels, channels)
    if stacked.stride() == strides:
        return stacked
    return stacked.new_empty((k, out, height, width, channels)).permute(0, 1, 4, 2, 3).copy_(stacked)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent), leaf, module)
