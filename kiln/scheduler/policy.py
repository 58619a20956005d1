"""Admission order for waiting requests: first-come-first-served, or VTC fair share by client.

A policy only orders the waiting queue and keeps the fairness counters; the scheduler decides what
fits. Preempted sequences go back to the front of their queue and are not charged again.

VTC (Sheng et al., OSDI 2024): each client ``u`` has a virtual token counter ``c_u``. Admitting a
request charges ``w_input`` per prompt token, every generated token charges ``w_output``; the
client with the smallest counter among those waiting is admitted next. A client that becomes
active again has its counter lifted to the minimum counter of the other active clients, so idle
time does not bank credit. Between backlogged clients the served service differs by at most
``2 * max(w_input * L_input, w_output * M)`` (M: tokens that fit in the KV cache).
"""

from __future__ import annotations

from collections import defaultdict, deque

from .sequence import Sequence


class FCFS:
    name = "fcfs"

    def __init__(self):
        self.queue: deque[Sequence] = deque()

    def __len__(self) -> int:
        return len(self.queue)

    def add(self, seq: Sequence) -> None:
        self.queue.append(seq)

    def add_front(self, seq: Sequence) -> None:
        self.queue.appendleft(seq)

    def peek(self) -> Sequence | None:
        return self.queue[0] if self.queue else None

    def pop(self) -> Sequence:
        return self.queue.popleft()

    def remove(self, seq: Sequence) -> None:
        self.queue.remove(seq)

    def waiting(self):
        return iter(self.queue)

    def on_admit(self, seq: Sequence) -> None: ...

    def on_output(self, seq: Sequence, n: int) -> None: ...

    def on_leave(self, seq: Sequence) -> None: ...


class VTC:
    name = "vtc"

    def __init__(self, w_input: float = 1.0, w_output: float = 2.0):
        self.w_input, self.w_output = w_input, w_output
        self.counters: dict[str | None, float] = defaultdict(float)
        self.queues: dict[str | None, deque[Sequence]] = {}
        self.running: dict[str | None, int] = defaultdict(int)  # running sequences per client
        self.served: dict[str | None, float] = defaultdict(float)  # weighted service, for observation
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _active(self, other_than) -> list[float]:
        clients = {u for u, q in self.queues.items() if q} | {u for u, n in self.running.items() if n}
        return [self.counters[u] for u in clients if u != other_than]

    def add(self, seq: Sequence) -> None:
        u = seq.user
        if not self.queues.get(u) and not self.running.get(u):  # the client (re)turns: no banked credit
            others = self._active(u)
            if others:
                self.counters[u] = max(self.counters[u], min(others))
        self.queues.setdefault(u, deque()).append(seq)
        self._n += 1

    def add_front(self, seq: Sequence) -> None:
        self.queues.setdefault(seq.user, deque()).appendleft(seq)
        self._n += 1

    def _next_queue(self) -> deque[Sequence] | None:
        """The queue of the waiting client with the smallest counter (ties: the client seen first)."""
        best, low = None, 0.0
        for u, q in self.queues.items():
            if q and (best is None or self.counters[u] < low):
                best, low = q, self.counters[u]
        return best

    def peek(self) -> Sequence | None:
        q = self._next_queue()
        return q[0] if q else None

    def pop(self) -> Sequence:
        seq = self._next_queue().popleft()
        self._n -= 1
        return seq

    def remove(self, seq: Sequence) -> None:
        self.queues[seq.user].remove(seq)
        self._n -= 1

    def waiting(self):
        for q in self.queues.values():
            yield from q

    def on_admit(self, seq: Sequence) -> None:
        self.running[seq.user] += 1
        if not seq.charged_input:
            seq.charged_input = True
            cost = self.w_input * seq.prompt_len
            self.counters[seq.user] += cost
            self.served[seq.user] += cost

    def on_output(self, seq: Sequence, n: int) -> None:
        cost = self.w_output * n
        self.counters[seq.user] += cost
        self.served[seq.user] += cost

    def on_leave(self, seq: Sequence) -> None:
        """A running sequence finished or was preempted."""
        self.running[seq.user] -= 1


def make_policy(name: str):
    if name == "fcfs":
        return FCFS()
    if name == "vtc":
        return VTC()
    raise ValueError(f"unknown scheduling policy {name!r} (fcfs or vtc)")
