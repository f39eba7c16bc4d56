"""Which task each training batch comes from (docs/pipeline.md), reproducibly and consistently across ranks.

Strategies for the probability p_t of drawing task t, with n_t its training size and N = sum of n_t:

* ``"uniform"``: 1/T, what the EPT paper states ("following MoRE");
* ``"proportional"``: n_t / N;
* ``"temperature"``: (n_t / N) ** (1 / temperature), normalised; HyperFormer's, with temperature 10;
* ``"exp"``: exp(n_t / N), normalised; what the EPT/MoRE code actually does (nearly uniform).

Per-task ``weights`` (a task declaration's ``weight``, default 1) multiply the strategy's probabilities, which are
then renormalised: under ``"uniform"``, p_t = w_t / sum of w.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

STRATEGIES = ("uniform", "proportional", "temperature", "exp")

# Tags that keep the random streams of task draws and of per-task example orders apart.
_TASK_DRAW_STREAM = 0
_EXAMPLE_ORDER_STREAM = 1
# Task draws are made for this many steps at once: seeding a generator costs more than the draws themselves,
# and resuming replays every step before the saved one.
_STEPS_PER_DRAW_BLOCK = 1024


def task_probabilities(
    sizes: Sequence[int], strategy: str, temperature: float = 10.0, task_weights: Sequence[float] | None = None
) -> np.ndarray:
    """The probability of drawing each task, given the tasks' training sizes and weights (see the module
    docstring)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes <= 0):
        raise ValueError(f"Task sizes must be a non-empty list of positive counts, got {sizes.tolist()}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown sampling strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}.")
    if strategy == "temperature" and temperature <= 0:
        raise ValueError(f"The sampling temperature must be positive, got {temperature}.")
    shares = sizes / sizes.sum()
    weights = {
        "uniform": lambda: np.ones_like(shares),
        "proportional": lambda: shares,
        "temperature": lambda: shares ** (1.0 / temperature),
        "exp": lambda: np.exp(shares),
    }[strategy]()
    weights = weights * _checked_weights(task_weights, len(sizes))
    return weights / weights.sum()


def _checked_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    if weights is None:
        return np.ones(count)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (count,) or not np.all(weights > 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"Task weights must be {count} positive numbers, one per task, got {weights.tolist()}.")
    return weights


class MultiTaskBatchSampler:
    """An endless stream of batches of ``(task_index, example_index)`` pairs for multi-task training.

    Args:
        task_sizes: number of training examples of each task, in task-id order.
        batch_size: examples per batch *on this rank*.
        strategy, temperature: how tasks are drawn, see :func:`task_probabilities`.
        homogeneous: True: every batch comes from one task (the EPT/MoRE and HyperFormer convention); the
            task is the same on every rank, and the ranks split that task's next examples between them.
            False: each example's task is drawn independently (mixed batches).
        seed: seeds everything; batch ``s`` depends only on ``seed``, ``s`` and the batches before it.
        weights: per-task sampling weights, multiplying the strategy's probabilities (default: all 1).
        rank, world_size: this process's place in data-parallel training.
        drop_last: homogeneous batches only: True discards the tail of a task's pass that cannot fill a
            global batch (every batch then holds distinct examples of one pass); False wraps into the next pass.

    Each task's examples are visited in a shuffled order, reshuffled (with a new seed) on every pass. Iterate
    it directly, take :meth:`batches`, or hand it to a ``torch.utils.data.DataLoader`` as ``batch_sampler``
    (with a dataset indexed by the pairs, or map pairs to a concatenated dataset's index with
    :meth:`flat_index`). There is no ``__len__``: training is step-based.
    """

    def __init__(
        self,
        task_sizes: Sequence[int],
        batch_size: int,
        strategy: str = "uniform",
        temperature: float = 10.0,
        homogeneous: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        weights: Sequence[float] | None = None,
    ):
        self.probabilities = task_probabilities(task_sizes, strategy, temperature, weights)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(task_sizes)
        self._cumulative = np.cumsum(self.probabilities)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} with world_size {world_size}.")
        self.task_sizes = tuple(int(size) for size in task_sizes)
        self.batch_size = batch_size
        self.strategy = strategy
        self.temperature = float(temperature)
        self.homogeneous = homogeneous
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.offsets = tuple(int(offset) for offset in np.cumsum((0, *self.task_sizes[:-1])))
        self._check_tasks_fill_a_batch()
        self._reset()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            yield self._next_batch()

    def batches(self, num_steps: int) -> list[list[tuple[int, int]]]:
        """The next ``num_steps`` batches."""
        return [self._next_batch() for _ in range(num_steps)]

    def flat_index(self, task_index: int, example_index: int) -> int:
        """The index of an example in the concatenation of all tasks' datasets, in task order."""
        return self.offsets[task_index] + example_index

    def state_dict(self) -> dict:
        """The number of batches drawn so far, with the settings that must match on resume."""
        return {"step": self._step, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after ``state["step"]`` batches, by replaying them (no example lists are kept).

        Only ``"step"`` is required, so a trainer may pass its own global step: a ``DataLoader`` that
        prefetches pulls batches ahead of training, so the sampler's own count can run ahead. Any settings in
        ``state`` must equal this sampler's; ``rank`` is not among them, so every rank can load rank 0's state.
        """
        self.check_compatible(state)
        self._reset()
        for _ in range(int(state["step"])):
            self._next_batch()

    def check_compatible(self, state: dict) -> None:
        """Raise ``ValueError`` unless the settings in ``state`` (all but ``"step"``) equal this sampler's."""
        mismatched = {
            key: value for key, value in state.items() if key != "step" and self._settings().get(key) != value
        }
        if mismatched:
            raise ValueError(
                f"Sampler state was saved with different settings {mismatched}; build the sampler "
                f"with the saved settings to resume (current: {self._settings()})."
            )

    def _settings(self) -> dict:
        return {
            "task_sizes": list(self.task_sizes),
            "batch_size": self.batch_size,
            "strategy": self.strategy,
            "temperature": self.temperature,
            "homogeneous": self.homogeneous,
            "seed": self.seed,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "weights": self.weights,
        }

    def _check_tasks_fill_a_batch(self) -> None:
        global_batch = self.batch_size * self.world_size
        too_small = [i for i, size in enumerate(self.task_sizes) if size < global_batch]
        if self.homogeneous and self.drop_last and too_small:
            raise ValueError(
                f"Tasks {too_small} have fewer examples than one global batch ({global_batch}), so "
                "drop_last=True would never yield a batch for them; pass drop_last=False."
            )

    def _reset(self) -> None:
        self._step = 0
        self._passes = [0] * len(self.task_sizes)  # index of the pass each task's stream is in
        self._positions = [0] * len(self.task_sizes)  # next position within that pass's order
        self._orders: dict[int, np.ndarray] = {}  # task -> its current pass's order
        self._draw_block: tuple[int, np.ndarray | None] = (-1, None)  # (block index, its task draws)

    def _next_batch(self) -> list[tuple[int, int]]:
        tasks = self._tasks_of_step(self._step)
        if self.homogeneous:
            task = int(tasks[0])
            global_batch = [(task, example) for example in self._take(task, self.batch_size * self.world_size)]
        else:
            global_batch = self._mixed_batch(tasks)
        self._step += 1
        start = self.rank * self.batch_size
        return global_batch[start : start + self.batch_size]

    def _tasks_of_step(self, step: int) -> np.ndarray:
        """The task drawn for each example of the global batch of ``step`` (one draw when homogeneous).

        Draws are made a block of steps at a time, from a generator seeded by (seed, block index): the same on
        every rank without communication, and independent of how the run was interrupted.
        """
        block, offset = divmod(step, _STEPS_PER_DRAW_BLOCK)
        if self._draw_block[0] != block:
            draws_per_step = 1 if self.homogeneous else self.batch_size * self.world_size
            uniforms = np.random.default_rng((self.seed, _TASK_DRAW_STREAM, block)).random(
                (_STEPS_PER_DRAW_BLOCK, draws_per_step)
            )
            # Inverse-CDF sampling; the clip guards against the last cumulative sum being a rounding error below 1.
            tasks = np.minimum(np.searchsorted(self._cumulative, uniforms, side="right"), len(self.task_sizes) - 1)
            self._draw_block = (block, tasks)
        return self._draw_block[1][offset]

    def _mixed_batch(self, tasks: np.ndarray) -> list[tuple[int, int]]:
        """Pair each drawn task with that task's next example, in draw order."""
        counts = np.bincount(tasks, minlength=len(self.task_sizes)).tolist()
        taken = [example for task, count in enumerate(counts) if count for example in self._take(task, count)]
        examples = np.empty(len(tasks), dtype=np.int64)
        # A stable sort by task lists the draws of task 0 first, then task 1, ...: the order ``taken`` has.
        examples[np.argsort(tasks, kind="stable")] = taken
        return list(zip(tasks.tolist(), examples.tolist()))

    def _take(self, task: int, count: int) -> list[int]:
        """The next ``count`` example indices of ``task``'s shuffled stream, starting new passes as needed."""
        size = self.task_sizes[task]
        if self.homogeneous and self.drop_last and self._positions[task] + count > size:
            self._start_new_pass(task)
        taken: list[int] = []
        while len(taken) < count:
            if self._positions[task] == size:
                self._start_new_pass(task)
            start = self._positions[task]
            stop = min(size, start + count - len(taken))
            taken.extend(self._order(task)[start:stop].tolist())
            self._positions[task] = stop
        return taken

    def _start_new_pass(self, task: int) -> None:
        self._passes[task] += 1
        self._positions[task] = 0
        self._orders.pop(task, None)

    def _order(self, task: int) -> np.ndarray:
        if task not in self._orders:
            rng = np.random.default_rng((self.seed, _EXAMPLE_ORDER_STREAM, task, self._passes[task]))
            self._orders[task] = rng.permutation(self.task_sizes[task])
        return self._orders[task]
