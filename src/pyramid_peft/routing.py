"""Per-example task routing that survives real use.

Stock PEFT drops a ``task_ids`` argument on its way to the layers for every method but Poly, and routing that
lives in hooks installed for one call dies before gradient checkpointing re-runs the layers in the backward pass.
Here the route is *state*: one :class:`TaskRoute` per tuner, shared by all its layers, set when a call enters the
model, kept (read-only) for the backward recomputation after the call returns, and replaced by the next call.

Entry points that set the route:

* a ``forward`` pre-hook on the ``PeftModel`` wrapper (it sees ``task_ids`` before ``PeftModelFor*.forward``
  swallows it), attached automatically when the tuner is built inside a ``PeftModel``;
* the tuner's ``_enable_peft_forward_hooks`` context, which PEFT enters around ``generate``;
* the tuner's own ``forward`` when it is used without a ``PeftModel``.

The outermost call defines the route; nested calls without ids inherit it. Layers read one id per row of their
input. Only inside ``generate`` may a batch be ``m`` times the routed one (beam search, ``num_return_sequences``):
each id is then repeated ``m`` times, matching the ``repeat_interleave`` that ``generate`` applies to its inputs.
Anywhere else a count that differs from the batch is an error (a single int id applies to every row).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch


class TaskRoutingError(ValueError):
    """Raised when task ids are missing, malformed or out of range."""


# Callables that explain why a call arrived without task ids (a stock Trainer dropping the column: see
# pyramid_peft.data.task_ids); each returns a sentence for the error, or None.
MISSING_IDS_HINTS: list = []


def _missing_ids_hints() -> str:
    return "".join(f" {hint}" for hint in (provider() for provider in MISSING_IDS_HINTS) if hint)


def in_backward_pass() -> bool:
    """True while autograd runs a backward pass (e.g. a gradient-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


def as_task_ids(task_ids, num_tasks: int, batch_size: int | None = None) -> torch.Tensor:
    """Validate ``task_ids`` (int, sequence or tensor) into a 1-D LongTensor of ids in ``[0, num_tasks)``."""
    if isinstance(task_ids, int) and not isinstance(task_ids, bool):
        task_ids = [task_ids] * (batch_size or 1)
    ids = torch.as_tensor(task_ids) if _all_numbers(task_ids) else None
    if ids is None or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TaskRoutingError(
            f"task_ids must be integer task indices, got {_describe(task_ids)}: pass a LongTensor (or list of ints) "
            f"of one id in [0, {num_tasks}) per example, e.g. the index of the task in the configured task list."
        )
    ids = ids.long().reshape(-1) if ids.dim() == 0 else ids.long()
    if ids.dim() != 1:
        raise TaskRoutingError(f"task_ids must be 1-D (one id per example), got shape {tuple(ids.shape)}.")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_tasks):
        bad = sorted({int(i) for i in ids.tolist() if not 0 <= i < num_tasks})
        raise TaskRoutingError(
            f"task_ids {bad} are outside [0, {num_tasks}): this adapter was built with num_tasks={num_tasks}. "
            "Use ids below num_tasks, or build the adapter with a larger num_tasks."
        )
    return ids


def _all_numbers(values) -> bool:
    """Whether ``values`` is a tensor, an array or a (nested) sequence of numbers: strings are not ids."""
    if isinstance(values, (str, bytes)):
        return False
    if isinstance(values, (list, tuple)):
        return all(_all_numbers(v) for v in values)
    return isinstance(values, (int, float, complex, torch.Tensor)) or hasattr(values, "__array__")


def _describe(values) -> str:
    """What the caller passed, for the error message: its kind and (briefly) its value."""
    if isinstance(values, torch.Tensor):
        return f"a tensor of dtype {values.dtype}"
    shown = repr(values) if len(repr(values)) <= 60 else repr(values)[:57] + "..."
    kinds = sorted({type(v).__name__ for v in values}) if isinstance(values, (list, tuple)) else [type(values).__name__]
    return f"{' and '.join(kinds)} values {shown}" if isinstance(values, (list, tuple)) else f"a {kinds[0]} {shown}"


class _Entry(NamedTuple):
    """One call's route: its ids, its attention mask, and whether a larger batch may repeat the ids (inside
    ``generate``, or ids given as one int)."""

    ids: torch.Tensor | None
    mask: torch.Tensor | None
    expandable: bool = False


_EMPTY = _Entry(None, None)


class TaskRoute:
    """Routing state of one tuner: the task ids (and attention mask) of the call in progress.

    ``num_tasks`` is used to validate ids; ``required`` says whether a layer that reads the route must get ids.
    """

    def __init__(self, num_tasks: int, method: str):
        self.num_tasks = num_tasks
        self.method = method
        self._stack: list[_Entry] = []
        self._retained: _Entry = _EMPTY
        self._generating = 0
        self.observer = None  # callable(layer_name, combine_weights, task_ids) while routing is being analysed

    # -- writing -----------------------------------------------------------------------------------------------
    def enter(self, task_ids=None, attention_mask: torch.Tensor | None = None, outermost: bool = False) -> None:
        """Start a call. Without ids, a nested call inherits the enclosing route; an outermost call clears it.

        Always pushes one entry, even when the ids are invalid (then it raises after pushing an empty route), so
        that every :meth:`exit` has its :meth:`enter`.
        """
        if outermost:
            self._stack.clear()
        if task_ids is None and self._stack:
            self._stack.append(self._stack[-1])
            return
        entry = _Entry(None, attention_mask, self._generating > 0)
        try:
            if task_ids is not None:
                batch = attention_mask.shape[0] if attention_mask is not None else None
                one_id = isinstance(task_ids, int) and attention_mask is None
                entry = entry._replace(
                    ids=as_task_ids(task_ids, self.num_tasks, batch), expandable=entry.expandable or one_id
                )
        except TaskRoutingError:
            self._stack.append(_EMPTY)
            raise
        self._stack.append(entry)

    def exit(self) -> None:
        """End a call; the outermost exit keeps the route for the backward pass only."""
        if self._stack:
            self._retained = self._stack.pop()

    @contextmanager
    def call(self, task_ids=None, attention_mask: torch.Tensor | None = None) -> Iterator[None]:
        try:
            self.enter(task_ids, attention_mask)
            yield
        finally:
            self.exit()

    @contextmanager
    def generation(self) -> Iterator[None]:
        """While open, routes entered may serve batches that ``generate`` expanded (beams, returned sequences)."""
        self._generating += 1
        try:
            yield
        finally:
            self._generating -= 1

    # -- reading -----------------------------------------------------------------------------------------------
    def _current(self) -> _Entry:
        if self._stack:
            return self._stack[-1]
        if in_backward_pass():
            return self._retained
        return _EMPTY

    def task_ids(self, batch_size: int, device: torch.device, required: bool = True) -> torch.Tensor | None:
        """The ids for a layer input of ``batch_size`` rows (expanded for beams / returned sequences in generate)."""
        entry = self._current()
        if entry.ids is None:
            if required:
                raise TaskRoutingError(
                    f"{self.method} routes each example by its task: call the model with task_ids=<LongTensor of "
                    f"one id per example in [0, {self.num_tasks})>, e.g. model(**batch, task_ids=ids) or "
                    "model.generate(..., task_ids=ids)." + _missing_ids_hints()
                )
            return None
        if not entry.expandable and entry.ids.shape[0] != batch_size:
            raise TaskRoutingError(
                f"task_ids has {entry.ids.shape[0]} entries but the batch has {batch_size} rows: pass exactly one "
                "task id per example (ids are repeated only inside generate, for beams and num_return_sequences)."
            )
        return expand_to_batch(entry.ids, batch_size).to(device)

    def observe(self, layer_name: str, weights: torch.Tensor, task_ids: torch.Tensor | None) -> None:
        """Report a layer's combine weights (rows first, experts last) to the observer, if one listens."""
        if self.observer is not None and not in_backward_pass():
            self.observer(layer_name, weights.detach(), None if task_ids is None else task_ids.detach())

    def attention_mask(self, batch_size: int, seq_len: int) -> torch.Tensor | None:
        """The call's attention mask if it matches this layer's (batch, seq) shape, else ``None``."""
        entry = self._current()
        mask = entry.mask
        if mask is None or mask.dim() != 2 or mask.shape[1] != seq_len or batch_size % mask.shape[0]:
            return None
        if mask.shape[0] != batch_size and not entry.expandable:
            return None
        return expand_to_batch(mask, batch_size)

    def token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The call's attention mask for token states ``x`` (batch, seq, features); None for rows without a
        sequence axis, or when no mask matches."""
        return self.attention_mask(x.shape[0], x.shape[1]) if x.dim() == 3 else None


def expand_to_batch(values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Repeat each row ``batch_size / len(values)`` times, as ``generate`` expands inputs for beams."""
    n = values.shape[0]
    if batch_size == n:
        return values
    if n == 0 or batch_size % n:
        raise TaskRoutingError(
            f"task_ids has {n} entries but a layer saw a batch of {batch_size}: pass exactly one task id per example."
        )
    return values.repeat_interleave(batch_size // n, dim=0)


def attach_to_peft_model(peft_model: torch.nn.Module, route: TaskRoute) -> None:
    """Make ``peft_model(..., task_ids=...)`` and ``peft_model.generate(..., task_ids=...)`` set ``route``.

    ``generate`` is wrapped (on this instance) so that the routes it enters may serve its expanded batches.
    """
    if getattr(peft_model, "_pyramid_route_attached", False):
        return
    special = getattr(peft_model, "special_peft_forward_args", None)
    if special is not None:
        special.add("task_ids")  # PEFT then strips it before calling the base model's forward / generate

    def pre_hook(_module, args, kwargs):
        route.enter(kwargs.get("task_ids"), kwargs.get("attention_mask"), outermost=True)

    def post_hook(_module, _args, _kwargs, _output):
        route.exit()

    peft_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    peft_model.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
    if hasattr(peft_model, "generate"):
        peft_model.generate = types.MethodType(_generate_with_expansion, peft_model)
    peft_model._pyramid_route_attached = True


def _generate_with_expansion(peft_model, *args, **kwargs):
    """``generate`` of the model's class, inside :meth:`TaskRoute.generation` of its tuner's route (a bound method:
    a deep copy of the model binds to the copy)."""
    with peft_model.base_model.route.generation():
        return type(peft_model).generate(peft_model, *args, **kwargs)


def find_enclosing_peft_model(max_depth: int = 8) -> torch.nn.Module | None:
    """The ``PeftModel`` whose ``__init__`` is building the caller, if any.

    PEFT constructs a tuner inside ``PeftModel.__init__`` without handing it a reference to the wrapper, and the
    wrapper is the only place that still sees ``task_ids`` in ``forward``. Looking up the constructing frame is the
    one way to attach to it without patching PEFT; :func:`pyramid_peft.enable_task_routing` does the same
    explicitly.
    """
    from peft import PeftModel

    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, PeftModel):
            return candidate
        frame = frame.f_back
    return None
