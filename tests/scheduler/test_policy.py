"""VTC's counters by hand: what admitting, serving and leaving charge, and the lift of a client that comes
back (Sheng et al.: a returning client's counter is raised to the smallest counter of the clients still
active, so time away banks no credit). Pure Python: the policy alone, driven as the scheduler drives it."""

from __future__ import annotations

import itertools

from kiln.scheduler.policy import VTC
from kiln.scheduler.sequence import Sequence

_ids = itertools.count()


def request(user: str, prompt_len: int = 10) -> Sequence:
    return Sequence(next(_ids), f"r{user}", [1] * prompt_len, prompt_len, 100, user=user)


def admit(vtc: VTC, user: str, prompt_len: int = 10) -> Sequence:
    """A request of ``user`` queued alone, popped and admitted (charged its prompt)."""
    seq = request(user, prompt_len)
    vtc.add(seq)
    assert vtc.pop() is seq
    vtc.on_admit(seq)
    return seq


def test_a_returning_client_is_lifted_to_the_least_active_counter():
    vtc = VTC(w_input=1.0, w_output=2.0)
    c = admit(vtc, "c")
    vtc.on_output(c, 5)
    vtc.on_leave(c)  # c finished and has nothing queued: it is away
    assert vtc.counters["c"] == 10 + 2 * 5
    a, _ = admit(vtc, "a", 100), admit(vtc, "b", 50)  # b arrives while a is active: lifted to 100 first
    vtc.on_output(a, 100)  # a and b are served while c is away
    assert (vtc.counters["a"], vtc.counters["b"]) == (300, 150)

    vtc.add(request("c"))  # c comes back: lifted to min(300, 150), not kept at 20, not raised to 300
    assert vtc.counters["c"] == 150
    for _ in range(5):
        vtc.add(request("c"))
    vtc.add(request("b"))
    order = []
    for _ in range(3):
        seq = vtc.pop()
        vtc.on_admit(seq)
        order.append(seq.user)
    # no burst: c (150, first in the tie) gets one request, 160 > 150 lets b in, then c again
    # (without the lift c, at 20, would take all six of its requests before b got one)
    assert order == ["c", "b", "c"]


def test_the_lift_never_lowers_a_counter_and_needs_the_client_away():
    vtc = VTC(w_input=1.0, w_output=2.0)
    a = admit(vtc, "a", 40)
    c = admit(vtc, "c", 10)
    vtc.on_output(c, 200)  # c (lifted to a's 40 on arrival) used a lot, then leaves
    vtc.on_leave(c)
    assert vtc.counters["c"] == 40 + 10 + 400
    vtc.add(request("c"))
    assert vtc.counters["c"] == 450  # above the active minimum (a: 40): kept, never lowered
    b = admit(vtc, "b", 10)  # b arrives while a and c are active: lifted to the least of them
    assert vtc.counters["b"] == 40 + 10  # min(40, 450), then its own prompt
    vtc.on_output(a, 100)  # a at 240; b is still running, so a new request of b is no return
    vtc.add(request("b"))
    assert vtc.counters["b"] == 50
    vtc.on_leave(b)  # b has a request waiting: still active, still not lifted
    vtc.add(request("b"))
    assert vtc.counters["b"] == 50


def test_a_client_alone_keeps_its_counter():
    vtc = VTC(w_input=1.0, w_output=2.0)
    c = admit(vtc, "c")
    vtc.on_leave(c)
    vtc.add(request("c"))  # nobody else is active: nothing to lift to
    assert vtc.counters["c"] == 10
