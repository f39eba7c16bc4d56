"""Per-example task routing that survives real use: stock PEFT, generation, checkpointing, threads, compile.

Stock PEFT drops a ``task_ids`` argument on its way to the layers for every method but Poly, and routing that
lives in hooks installed for one call dies before gradient checkpointing re-runs the layers in the backward pass.
Here each call gets its own :class:`CallRoute`: the task ids (validated and placed on the model's device once, at
entry), the attention mask, the auxiliary-loss records the layers leave, and per-call scratch (MixLoRA's hand-off,
TuckA's route, factor caches). A tuner's :class:`TaskRoute` finds the call of the running thread through
thread-local state, so concurrent calls on one model (threads of an inference server) never see each other's ids;
layers read it without a host synchronisation, and ``torch.compile`` traces the read (it cannot trace a
``ContextVar``; a forward never yields to another coroutine of its thread, so per-thread state is per call).

Entry points that open a call:

* a ``forward`` pre-hook on the ``PeftModel`` wrapper (it sees ``task_ids`` before ``PeftModelFor*.forward``
  swallows it), attached automatically when the tuner is built inside a ``PeftModel``;
* the tuner's ``_enable_peft_forward_hooks`` context, which PEFT enters around ``generate`` (one call for the whole
  generation, so whatever a layer caches per call is built once per ``generate``, not per decoding step);
* the tuner's own ``forward`` when it is used without a ``PeftModel``.

The outermost call defines the route; nested calls without ids inherit it. Layers read one id per row of their
input. Only inside ``generate`` may a batch be ``m`` times the routed one (beam search, ``num_return_sequences``):
each id is then repeated ``m`` times, matching the ``repeat_interleave`` that ``generate`` applies to its inputs.
Anywhere else a count that differs from the batch is an error (a single int id applies to every row).

The backward pass. Gradient checkpointing re-runs layers inside ``backward``, after the call returned and, on CUDA,
on autograd's own threads, where the thread-local state of the forward is not visible. A call that recorded a graph
hooks its outputs' gradient functions (:meth:`TaskRoute.bind_backward`): when a backward pass reaches them, before it
reaches any layer of the call, the call is registered under that backward pass (autograd's graph task), and a layer
re-run inside it reads that call, so two calls' backward passes running at once (threads, or one call's backward
after another call's forward) each see their own route. A re-run in a backward pass that reached no hooked output
reads the last call that recorded a graph. Re-runs never record auxiliary losses or advance routing state.
"""

from __future__ import annotations

import functools
import sys
import threading
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

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
    return validated_task_ids(task_ids, num_tasks, batch_size)[0]


def validated_task_ids(task_ids, num_tasks: int, batch_size: int | None = None) -> tuple[torch.Tensor, bool]:
    """:func:`as_task_ids` and whether every id is the same task, from one host synchronisation (none for ids
    given on the CPU)."""
    ids = _as_long_ids(task_ids, num_tasks, batch_size)
    if not ids.numel():
        return ids, False
    low, high = torch.stack([ids.min(), ids.max()]).tolist()
    if low < 0 or high >= num_tasks:
        bad = sorted({int(i) for i in ids.tolist() if not 0 <= i < num_tasks})
        raise TaskRoutingError(
            f"task_ids {bad} are outside [0, {num_tasks}): this adapter was built with num_tasks={num_tasks}. "
            "Use ids below num_tasks, or build the adapter with a larger num_tasks."
        )
    return ids, low == high


def _as_long_ids(task_ids, num_tasks: int, batch_size: int | None) -> torch.Tensor:
    """``task_ids`` as a 1-D LongTensor (no range check): the type and shape errors of :func:`as_task_ids`."""
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


class CallRoute:
    """Everything one call of a routed model owns.

    ``ids`` (validated, on the model's device) and ``mask`` come from the caller; ``expandable`` says whether a
    larger batch may repeat the ids (inside ``generate``, or ids given as one int); ``uniform`` whether every row
    has the same task (known on the host at entry). ``records`` holds each layer's auxiliary-loss tensors of this
    call and ``scratch`` what layers hand each other (both shared with the calls nested in it, such as the tuner's
    ``forward`` inside the ``PeftModel``'s); ``cache`` what a layer derives from this call's route, kept for the
    call only.
    """

    def __init__(self, ids=None, mask=None, expandable: bool = False, uniform: bool = False, generating=False):
        self.ids: torch.Tensor | None = ids
        self.mask: torch.Tensor | None = mask
        self.expandable = expandable
        self.uniform = uniform
        self.generating = generating  # a ``generate`` call: layers run once per decoding step
        self.records: dict[Any, dict[str, torch.Tensor]] = {}
        self.scratch: dict[Any, Any] = {}
        self.cache: dict[Any, Any] = {}
        self._expanded: dict[int, torch.Tensor] = {}
        self.given_ids = None  # the ids as the caller gave them (a nested entry given the same object inherits)

    def nested(self, route: CallRoute | None = None) -> CallRoute:
        """A call opened inside this one: its own ``route`` (this one's when None), this one's records and scratch."""
        if route is None:  # the same ids: what layers derived from them holds too
            route = CallRoute(self.ids, self.mask, self.expandable, self.uniform, self.generating)
            route._expanded, route.cache = self._expanded, self.cache
        route.records, route.scratch = self.records, self.scratch
        return route

    def ids_for(self, batch_size: int) -> torch.Tensor:
        """The ids for ``batch_size`` rows, expanded (once per size) for beams and returned sequences."""
        ids = self._expanded.get(batch_size)
        if ids is None:
            ids = self._expanded[batch_size] = expand_to_batch(self.ids, batch_size)
        return ids


class _State(NamedTuple):
    """A route's view from one thread: the open calls (innermost last), the last finished outermost call, and how
    many ``generate`` calls are open."""

    stack: tuple[CallRoute, ...] = ()
    last: CallRoute | None = None
    generating: int = 0


_NO_CALLS = _State()


class _ThreadState(threading.local):
    """A route's :class:`_State` as each thread sees it."""

    value: _State = _NO_CALLS

    def get(self) -> _State:
        return self.value

    def set(self, value: _State) -> None:
        self.value = value


class TaskRoute:
    """Routing of one tuner: finds the :class:`CallRoute` of the running call.

    ``num_tasks`` is used to validate ids; ``method`` names the method in errors; ``observer`` (a callable
    ``(layer_name, combine_weights, task_ids)``) is a model-wide setting for routing analyses; ``planner`` (a
    callable of the new :class:`CallRoute`, set by the tuner) runs at entry, after the ids are placed, to derive
    the host-side facts the layers need about this call's route in one synchronisation.
    """

    def __init__(self, num_tasks: int, method: str):
        self.num_tasks = num_tasks
        self.method = method
        self.observer = None
        self.planner = None
        self._init_state()

    def _init_state(self) -> None:
        self._state = _ThreadState()
        self._retained: CallRoute | None = None  # the last call that recorded a graph: re-runs of unhooked backwards
        # graph task id -> the call whose outputs that backward pass reached (the hooks on its graph hold it)
        self._backward_calls: weakref.WeakValueDictionary[int, CallRoute] = weakref.WeakValueDictionary()

    # Copies and pickles (deepcopy of a model, torch.save) carry the settings, not the calls in progress.
    def __getstate__(self) -> dict:
        return {"num_tasks": self.num_tasks, "method": self.method, "observer": self.observer, "planner": self.planner}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_state()

    # -- writing -----------------------------------------------------------------------------------------------
    @torch.compiler.disable
    def enter(
        self,
        task_ids=None,
        attention_mask: torch.Tensor | None = None,
        outermost: bool = False,
        device: torch.device | None = None,
    ) -> None:
        """Open a call. Without ids, a nested call inherits the enclosing route; an outermost call starts afresh.

        The ids are validated and moved to ``device`` (the model's) here, once: the one host synchronisation of a
        routed forward. Always opens a call, even when the ids are invalid (then it raises after opening an empty
        one), so that every :meth:`exit` has its :meth:`enter`.
        """
        state = self._state.get()
        stack = () if outermost else state.stack
        if stack and task_ids is not None and stack[-1].given_ids is task_ids and stack[-1].mask is attention_mask:
            task_ids = None  # the enclosing call's own ids again (PEFT's context inside our pre-hook): no new plan
        generating = state.generating > 0
        call = (
            None if task_ids is None else CallRoute(mask=attention_mask, expandable=generating, generating=generating)
        )
        if stack:
            call = stack[-1].nested(call)
        elif call is None:
            call = CallRoute(mask=attention_mask, expandable=generating, generating=generating)
        self._state.set(state._replace(stack=(*stack, call)))
        if task_ids is not None:
            batch = attention_mask.shape[0] if attention_mask is not None else None
            call.expandable = call.expandable or (isinstance(task_ids, int) and attention_mask is None)
            call.ids, call.uniform = self._place(task_ids, batch, device)
            call.given_ids = task_ids
            if self.planner is not None:
                self.planner(call)

    def _place(self, task_ids, batch: int | None, device: torch.device | None) -> tuple[torch.Tensor, bool]:
        """Validated ids on ``device`` and whether they are all one task."""
        ids, uniform = validated_task_ids(task_ids, self.num_tasks, batch)
        return (ids if device is None else ids.to(device, non_blocking=True)), uniform

    @torch.compiler.disable
    def exit(self) -> None:
        """Close the innermost call. The outermost one becomes the thread's last call (what ``aux_loss`` reads)
        and, when it recorded a graph, the route's retained call for backward re-runs."""
        state = self._state.get()
        if not state.stack:
            return
        call, stack = state.stack[-1], state.stack[:-1]
        self._state.set(state._replace(stack=stack, last=state.last if stack else call))
        if not stack and torch.is_grad_enabled():
            self._retained = call

    @torch.compiler.disable
    def bind_backward(self, output) -> None:
        """Hook the gradient functions of ``output``'s tensors (nested in tuples, lists and dicts: a model output)
        so that a backward pass through them registers the open outermost call for its re-runs. Only a call that
        records a graph binds."""
        state = self._state.get()
        if len(state.stack) != 1 or not torch.is_grad_enabled():
            return
        register = functools.partial(_register_backward_call, weakref.ref(self), state.stack[0])
        for tensor in _tensors(output):
            if tensor.grad_fn is not None:
                tensor.grad_fn.register_prehook(register)

    @contextmanager
    def call(self, task_ids=None, attention_mask: torch.Tensor | None = None, device=None) -> Iterator[None]:
        try:
            self.enter(task_ids, attention_mask, device=device)
            yield
        finally:
            self.exit()

    @contextmanager
    def generation(self) -> Iterator[None]:
        """While open, routes entered may serve batches that ``generate`` expanded (beams, returned sequences)."""
        state = self._state.get()
        self._state.set(state._replace(generating=state.generating + 1))
        try:
            yield
        finally:
            state = self._state.get()
            self._state.set(state._replace(generating=state.generating - 1))

    # -- reading -----------------------------------------------------------------------------------------------
    def current(self) -> CallRoute:
        """The running call: the innermost open one, else (in a backward re-run) the retained one, else this
        thread's implicit call (layers run without any entry point: no ids, records kept as the last call)."""
        state = self._state.get()
        if state.stack:
            return state.stack[-1]
        if in_backward_pass():
            call = self._backward_calls.get(torch._C._current_graph_task_id(), self._retained)
            if call is not None:
                return call
        if state.last is None or state.last.ids is not None:
            state = state._replace(last=CallRoute())
            self._state.set(state)
        return state.last

    def recording(self) -> CallRoute | None:
        """The call whose records and routing state a layer may write now: ``None`` in a backward re-run."""
        state = self._state.get()
        if state.stack:
            return state.stack[-1]
        return None if in_backward_pass() else self.current()

    def recent(self) -> CallRoute | None:
        """The call whose auxiliary losses count now: the open one, else the last one this thread finished."""
        state = self._state.get()
        return state.stack[-1] if state.stack else state.last

    def finished_calls(self) -> list[CallRoute]:
        """The finished calls this route still holds: this thread's last one and the one kept for backward
        re-runs (what ``delete_adapter`` clears of a deleted adapter)."""
        calls = [self._state.get().last, self._retained]
        return [call for i, call in enumerate(calls) if call is not None and call not in calls[:i]]

    def task_ids(self, batch_size: int, device: torch.device, required: bool = True) -> torch.Tensor | None:
        """The ids for a layer input of ``batch_size`` rows (expanded for beams / returned sequences in generate)."""
        call = self.current()
        if call.ids is None:
            if required:
                raise TaskRoutingError(
                    f"{self.method} routes each example by its task: call the model with task_ids=<LongTensor of "
                    f"one id per example in [0, {self.num_tasks})>, e.g. model(**batch, task_ids=ids) or "
                    "model.generate(..., task_ids=ids)." + _missing_ids_hints()
                )
            return None
        if not call.expandable and call.ids.shape[0] != batch_size:
            raise TaskRoutingError(
                f"task_ids has {call.ids.shape[0]} entries but the batch has {batch_size} rows: pass exactly one "
                "task id per example (ids are repeated only inside generate, for beams and num_return_sequences)."
            )
        ids = call.ids_for(batch_size)
        return ids if ids.device == device else ids.to(device)  # models split over devices

    def observe(self, layer_name: str, weights: torch.Tensor, task_ids: torch.Tensor | None) -> None:
        """Report a layer's combine weights (rows first, experts last) to the observer, if one listens."""
        if self.observer is not None and not in_backward_pass():
            self.observer(layer_name, weights.detach(), None if task_ids is None else task_ids.detach())

    def attention_mask(self, batch_size: int, seq_len: int) -> torch.Tensor | None:
        """The call's attention mask if it matches this layer's (batch, seq) shape, else ``None``."""
        call = self.current()
        mask = call.mask
        if mask is None or mask.dim() != 2 or mask.shape[1] != seq_len or batch_size % mask.shape[0]:
            return None
        if mask.shape[0] != batch_size and not call.expandable:
            return None
        return expand_to_batch(mask, batch_size)

    def token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The call's attention mask for token states ``x`` (batch, seq, features); None for rows without a
        sequence axis, or when no mask matches."""
        return self.attention_mask(x.shape[0], x.shape[1]) if x.dim() == 3 else None


def _register_backward_call(route_ref, call: CallRoute, _grad_outputs) -> None:
    """A gradient-function pre-hook: the running backward pass re-runs ``call``'s layers."""
    route = route_ref()
    if route is not None:
        route._backward_calls[torch._C._current_graph_task_id()] = call


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):  # a transformers ModelOutput too
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


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


def input_device(kwargs: dict) -> torch.device | None:
    """The device of a call's inputs (where its ids go): that of the first tensor among the model inputs."""
    for name in ("input_ids", "inputs_embeds", "attention_mask", "decoder_input_ids", "pixel_values"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value.device
    return None


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
        route.enter(kwargs.get("task_ids"), kwargs.get("attention_mask"), outermost=True, device=input_device(kwargs))

    def post_hook(_module, _args, _kwargs, output):
        route.bind_backward(output)
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
