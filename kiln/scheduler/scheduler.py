"""Iteration-level continuous batching.

Each ``schedule()`` returns a plain ``Batch``: which sequences run, how many of their tokens each
computes, and which were preempted. The model runner executes it; the scheduler never runs the
model, and the runner makes no decisions. The scheduler does own the KV cache's sequence table
(add, fork, remove) and reads its free-page count, because admission, prefix reuse and preemption
are decisions about pages.

One step, under a token budget (Sarathi-Serve's stall-free batching):
1. every running decode (1 token each), oldest first;
2. running prompts continue in chunks with what is left of the budget;
3. waiting requests are admitted in policy order (FCFS or VTC) while the budget, ``max_num_seqs``
   and the free pages allow; an admitted prompt first takes the longest prefix the prefix cache
   holds (a fork of the cached sequence), so only its new tokens are computed.
When a running sequence needs a page and none is free, cached prefixes are evicted (LRU); if that
is not enough the newest running sequence is preempted by recompute: its pages are freed and it
waits at the front of the queue with its prompt and output as the tokens to recompute.

Page arithmetic is the KV cache's (``append_cost``, ``fork_cost``, ``fork_point``): TVM's paged cache
takes ``ceil((L+k)/P) - ceil(L/P)`` pages to append k tokens to a sequence of length L and copies the
page a fork lands inside; kiln's grouped cache (runtime/kv_groups.py) counts blocks per KV owner and
forks at whole pages only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .policy import make_policy
from .radix import PrefixCache
from .sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences at once
    max_batched_tokens: int = 512  # tokens computed per step
    page_size: int = 16
    policy: str = "fcfs"
    prefix_cache: bool = True
    max_cached_seqs: int = 256  # finished sequences kept for prefix reuse


@dataclass
class Batch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # (batch row, sequence, choice index) of every choice sampled from this step's logits: each sequence whose
    # tokens this step reaches the end of, and after an n > 1 prompt its children-to-be, on the prompt's row
    samples: list[tuple[int, Sequence, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def seq_ids(self) -> list[int]:
        return [s.seq_id for s in self.seqs]

    @property
    def token_lists(self) -> list[list[int]]:
        return [s.tokens[s.num_computed:s.num_computed + k] for s, k in zip(self.seqs, self.num_tokens)]


@dataclass
class SchedulerStats:
    prefix_cache_hits: int = 0
    prefix_cache_hit_tokens: int = 0
    prompt_tokens: int = 0
    prefill_tokens_computed: int = 0
    generation_tokens: int = 0
    preemptions: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv):
        self.config = config
        self.kv = kv  # the KVCache protocol (kiln/runtime/kv_cache.py)
        self.policy = make_policy(config.policy)
        self.running: list[Sequence] = []  # admission order
        self.cache = PrefixCache()
        self.cached_pages = kv.page_set()  # the pages of the prefix cache's entries, kept with it
        self.stats = SchedulerStats()
        self._ids = itertools.count()

    def new_seq_id(self) -> int:
        return next(self._ids)

    # -- queue management ------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.policy.add(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    def has_work(self) -> bool:
        return bool(self.running) or len(self.policy) > 0

    @property
    def num_cached_pages(self) -> int:
        """KV pages that the prefix cache's entries hold and no running sequence does: what evicting every
        entry would free. Counted from the entries' own pages (``cached_pages``), not from the free count,
        so with nothing running it equals the pages in use only if no page leaked."""
        return self.cached_pages.num_pages - self.cached_pages.num_held_by(s.seq_id for s in self.running)

    def abort(self, seq: Sequence) -> None:
        if seq.status is Status.WAITING:
            self.policy.remove(seq)
        elif seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.policy.on_leave(seq)
            self.kv.remove_sequence(seq.seq_id)
        seq.status = Status.FINISHED

    def finish(self, seq: Sequence) -> None:
        """A running sequence is done: keep its KV for prefix reuse, or free it."""
        assert seq.status is Status.RUNNING
        self.running.remove(seq)
        self.policy.on_leave(seq)
        seq.status = Status.FINISHED
        kept = seq.tokens[:seq.num_computed]
        if not self.config.prefix_cache or not kept or self.cache.covers(kept):
            self.kv.remove_sequence(seq.seq_id)
            return
        self.cache.insert(seq.seq_id, kept)
        self.cached_pages.add(seq.seq_id, len(kept))
        while len(self.cache) > self.config.max_cached_seqs:
            self._evict_one()

    def _fork(self, parent: Sequence, tokens: list[list[int]]) -> list[Sequence]:
        """Children of a sequence whose prompt is computed (n > 1), each with its own first token.

        ``parent.tokens`` already ends with the parent's sampled token; a child shares the KV of the
        prompt and continues with ``tokens[i]``. The page a fork inside a page copies was reserved when
        the prompt's last chunk was scheduled; a cache that forks at whole pages only (``fork_point``)
        leaves the child the rest of the prompt to recompute.
        """
        children = []
        pos = self.kv.fork_point(parent.seq_id, parent.num_computed)  # a child recomputes what it cannot share
        for i, extra in enumerate(tokens):
            child = Sequence(self.new_seq_id(), parent.request_id, parent.tokens[:parent.num_computed] + extra,
                             parent.prompt_len,
                             parent.max_tokens, index=parent.index + 1 + i, user=parent.user, arrival=parent.arrival,
                             num_computed=pos, num_cached=parent.num_cached, status=Status.RUNNING,
                             charged_input=True)
            self.kv.fork_sequence(parent.seq_id, child.seq_id, pos)
            self.running.append(child)
            self.policy.on_admit(child)
            children.append(child)
        parent.forks = 0
        return children

    # -- one step --------------------------------------------------------------------------------

    def _need(self, seq: Sequence, k: int) -> int:
        need = self.kv.append_cost(seq.num_computed, k)
        end = seq.num_computed + k
        if seq.forks and end == len(seq.tokens):
            need += seq.forks * self.kv.fork_cost(seq.seq_id, end)  # each child's copy of the partial last page
        return need

    def _evict_one(self) -> bool:
        lru = self.cache.lru()
        if not lru:
            return False
        self.cache.remove(lru[0])
        self.cached_pages.remove(lru[0])
        self.kv.remove_sequence(lru[0])
        return True

    def _make_room(self, need: int, reserved: int) -> bool:
        """Evict cached prefixes until ``need`` pages are free beyond the ``reserved`` ones; whether they are."""
        while need > self.kv.num_free_pages - reserved:
            if not self._evict_one():
                return False
        return True

    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        self.running.remove(seq)
        self.policy.on_leave(seq)
        self.kv.remove_sequence(seq.seq_id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.policy.add_front(seq)
        batch.preempted.append(seq)
        self.stats.preemptions += 1

    def schedule(self) -> Batch:
        """The next step's batch. Pages it needs are ``reserved`` here and taken by the forward itself."""
        batch = Batch()
        budget = self.config.max_batched_tokens
        reserved = 0
        planned: list[tuple[Sequence, int]] = []
        decodes = [s for s in self.running if s.remaining == 1]
        prompts = [s for s in self.running if s.remaining > 1]
        for seq in decodes + prompts:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            k = min(seq.remaining, budget)
            need = self._need(seq, k)
            while not self._make_room(need, reserved):  # preempt the newest running sequence not yet planned
                victim = next(s for s in reversed(self.running) if all(s is not q for q, _ in planned))
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            planned.append((seq, k))
            budget -= k
            reserved += need
        if not batch.preempted:  # nothing was short of pages: admit new work
            self._admit(planned, budget, reserved)
        for row, (seq, k) in enumerate(planned):
            batch.seqs.append(seq)
            batch.num_tokens.append(k)
            if seq.num_computed + k == len(seq.tokens):
                batch.samples += [(row, seq, seq.index + i) for i in range(1 + seq.forks)]
        return batch

    def _admit(self, planned: list, budget: int, reserved: int) -> None:
        unborn = sum(s.forks for s in self.running)  # children of running n > 1 prompts, forked once they finish
        while budget > 0:
            seq = self.policy.peek()
            if seq is None or len(self.running) + unborn + 1 + seq.forks > self.config.max_num_seqs:
                break
            parent, hit = (None, 0)
            if self.config.prefix_cache:
                parent, hit = self.cache.match(seq.tokens[:len(seq.tokens) - 1])
                if parent is not None:
                    hit = self.kv.fork_point(parent, hit)
                    parent = parent if hit else None
            k = min(len(seq.tokens) - hit, budget)
            end = hit + k
            copy = self.kv.fork_cost(parent, hit) if parent is not None else 0  # what the fork itself takes
            need = copy + self.kv.append_cost(hit, k) + (  # its own n > 1 children fork from it at the end
                seq.forks * self.kv.fork_cost(seq.seq_id, end) if seq.forks and end == len(seq.tokens) else 0)
            if not self._make_room(need, reserved):
                break
            if parent is not None and parent not in self.cache:  # making room evicted the prefix we matched
                continue  # match again against what is left
            self.policy.pop()
            if parent is not None:
                self.kv.fork_sequence(parent, seq.seq_id, hit)  # takes the copied page now
                self.stats.prefix_cache_hits += 1
                self.stats.prefix_cache_hit_tokens += hit
            else:
                self.kv.add_sequence(seq.seq_id)
            if seq.admissions == 0:
                self.stats.prompt_tokens += seq.prompt_len
            seq.admissions += 1
            seq.num_computed = hit
            seq.num_cached = hit
            seq.status = Status.RUNNING
            self.running.append(seq)
            unborn += seq.forks
            self.policy.on_admit(seq)
            planned.append((seq, k))
            budget -= k
            reserved += need - copy

    def postprocess(self, batch: Batch, tokens: list[int], finished: list[bool]) -> list[Sequence]:
        """The batch ran and drew ``tokens[j]`` for ``batch.samples[j]``: its computed tokens have KV now; each
        sampled sequence gets its token; an n > 1 prompt's children are forked off it, each with its own first
        token; the samples marked ``finished`` end (their KV kept for prefix reuse, or freed). Returns the new
        children."""
        assert len(tokens) == len(finished) == len(batch.samples)
        for seq, k in zip(batch.seqs, batch.num_tokens):
            if not (k == 1 and seq.is_decode):
                self.stats.prefill_tokens_computed += k
            seq.num_computed += k
        ended, children, firsts = [], [], {}
        for (_, seq, index), token, fin in zip(batch.samples, tokens, finished):
            if index != seq.index:  # a child-to-be: forked below, once its parent has its own token
                firsts.setdefault(seq, []).append((token, fin))
                continue
            seq.tokens.append(token)
            ended += [seq] if fin else []
        for parent, kids in firsts.items():
            for child, (_, fin) in zip(self._fork(parent, [[t] for t, _ in kids]), kids):
                children.append(child)
                ended += [child] if fin else []
        self.stats.generation_tokens += len(tokens)
        for seq in [s for _, s, i in batch.samples if i == s.index] + children:
            self.policy.on_output(seq, 1)
        for seq in ended:
            self.finish(seq)
        return children

    def clear_prefix_cache(self) -> None:
        """Drop every prefix-cache entry (their pages come back unless a running fork still uses them)."""
        while self._evict_one():
            pass
