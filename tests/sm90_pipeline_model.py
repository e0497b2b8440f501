"""The synchronisation protocol of csrc/cuda/factored_scores_sm90.cu, transcribed step by step
into Python and run under random interleavings: the part of a hand-written TMA + wgmma
pipeline that is easiest to get wrong (mbarrier phases and parities, which step releases which
stage, who refills it and when, the order across tile ends of a persistent CTA) and that would
otherwise first show up as a hang or a wrong answer on an H100.

Modelled: the full and empty mbarriers of each stage (arrival counts, transaction bytes, phase
completion, ``try_wait.parity``), TMA loads completing at random later times, each consumer
warpgroup's wgmma batches completing in order at random later times (``wgmma.wait_group k``
blocks until at most k are outstanding), the producer (an elected thread of warpgroup 0, or the
producer warpgroup in "ws" mode), and the consumers' named barriers in the epilogue. One agent
per warpgroup: the threads of a warpgroup move together through the wgmma instructions.

Checked: no deadlock; every wait is for the phase the code means (not one two phases away,
which a parity cannot tell apart); a stage is overwritten only after every consumer has
released its previous step and no wgmma still reads it; every wgmma reads the step it expects;
every step is loaded once and consumed once by each consumer warpgroup.

Not modelled: the data (CuTe's layouts are checked by its static assertions and the GPU tests).
"""
from __future__ import annotations

import random
from typing import Callable, Dict, Generator, List, Optional

KINDS = {"wait0": 0, "1": 1, "ws": 1}  # mode -> wgmma batches left in flight


class ProtocolError(AssertionError):
    pass


class MBarrier:
    def __init__(self, name: str, count: int):
        self.name, self.count, self.pending, self.tx, self.completed = name, count, count, 0, 0

    def arrive(self):
        self.pending -= 1
        if self.pending < 0:
            raise ProtocolError(f"{self.name}: more arrivals than its count")
        self._complete()

    def expect_tx(self, n: int):
        self.tx += n

    def complete_tx(self, n: int):
        self.tx -= n
        if self.tx < 0:
            raise ProtocolError(f"{self.name}: more bytes than expected")
        self._complete()

    def _complete(self):
        if self.pending == 0 and self.tx == 0:
            self.completed += 1
            self.pending = self.count

    def ready(self, parity: int, phase: int) -> bool:
        """try_wait.parity(parity) for code that means "phase number `phase` has completed"."""
        if parity != phase % 2:
            raise ProtocolError(f"{self.name}: parity {parity} for phase {phase}")
        ok = (self.completed % 2) != parity  # the hardware's answer: the current phase's parity differs
        if ok and self.completed != phase + 1:
            raise ProtocolError(f"{self.name}: a wait for phase {phase} passed with {self.completed} phases "
                                f"completed (parity alias)")
        return ok


class Pipeline:
    """One CTA running `tiles` tiles of `k_tiles` K steps each through `stages` stages."""

    release_at_tile_end = True  # the kernel's release of a tile's last step (False: a mutant for the tests)

    def __init__(self, mode: str, stages: int, k_tiles: int, tiles: int, rng: random.Random):
        self.mode, self.S, self.k_tiles, self.tiles, self.rng = mode, stages, k_tiles, tiles, rng
        self.in_flight = KINDS[mode]
        self.ws = mode == "ws"
        self.steps = tiles * k_tiles
        self.wgs = 2  # consumer warpgroups
        self.full = [MBarrier(f"full[{s}]", 1) for s in range(stages)]
        self.empty = [MBarrier(f"empty[{s}]", self.wgs) for s in range(stages)]
        self.stage_data: List[Optional[int]] = [None] * stages  # step whose data a stage holds
        self.outstanding: Dict[int, List[int]] = {w: [] for w in range(self.wgs)}  # wgmma steps in flight
        self.released = [0] * self.steps  # consumer warpgroups that released each step
        self.consumed = [0] * self.steps
        self.loaded: List[int] = []
        self.events: List[Callable[[], None]] = []  # asynchronous completions (TMA, wgmma)
        self.barrier_count, self.barrier_gen = 0, 0

    # -- the producer's TMA issue ----------------------------------------------------------
    def issue(self, g: int, st: int):
        if g >= self.S and self.released[g - self.S] != self.wgs:
            raise ProtocolError(f"step {g} loaded into stage {st} before step {g - self.S} was released")
        for w, steps in self.outstanding.items():
            if any(x % self.S == st for x in steps):
                raise ProtocolError(f"step {g} loaded into stage {st} while warpgroup {w}'s wgmma reads it")
        self.full[st].expect_tx(2)  # arrive_and_expect_tx, then the two TMA copies (A and B tiles)
        self.full[st].arrive()
        self.stage_data[st] = None
        self.loaded.append(g)
        for _ in range(2):
            def done(st=st, g=g):  # a stale load landing after the stage was reissued shows as step g
                self.stage_data[st] = g
                self.full[st].complete_tx(1)
            self.events.append(done)

    # -- agents: generators that yield a condition to wait for ----------------------------
    def release(self, wg: int, done: int) -> Generator:
        if done in self.outstanding[wg]:
            raise ProtocolError(f"warpgroup {wg} released step {done} while its wgmma is in flight")
        st = done % self.S
        self.released[done] += 1
        self.empty[st].arrive()
        if not self.ws and wg == 0 and done + self.S < self.steps:  # the producer is in warpgroup 0
            phase = done // self.S
            yield lambda: self.empty[st].ready(phase & 1, phase)
            self.issue(done + self.S, st)

    def wgmma(self, wg: int, g: int):
        """Warpgroup wg issues step g's wgmma batch; it completes later, after its older ones."""
        st = g % self.S
        if self.stage_data[st] != g:
            raise ProtocolError(f"warpgroup {wg}'s wgmma for step {g} found step {self.stage_data[st]} in stage {st}")
        self.outstanding[wg].append(g)

        def complete():
            self.consumed[self.outstanding[wg].pop(0)] += 1
        self.events.append(complete)

    def k_step(self, wg: int, g: int, kt: int) -> Generator:
        st = g % self.S
        phase = g // self.S
        yield lambda: self.full[st].ready(phase & 1, phase)
        self.wgmma(wg, g)
        yield lambda: len(self.outstanding[wg]) <= self.in_flight  # warpgroup_wait<kInFlight>
        if self.in_flight == 0:
            yield from self.release(wg, g)
        elif kt > 0:
            yield from self.release(wg, g - 1)

    def named_barrier(self) -> Generator:
        gen = self.barrier_gen
        self.barrier_count += 1
        if self.barrier_count == self.wgs:
            self.barrier_count, self.barrier_gen = 0, self.barrier_gen + 1
        yield lambda: self.barrier_gen > gen

    def consumer(self, wg: int) -> Generator:
        if not self.ws and wg == 0:
            for g in range(min(self.S, self.steps)):
                self.issue(g, g)
        g = 0
        for _ in range(self.tiles):
            for kt in range(self.k_tiles):
                yield from self.k_step(wg, g, kt)
                g += 1
            if self.in_flight:
                yield lambda: not self.outstanding[wg]  # warpgroup_wait<0>
                if self.release_at_tile_end:
                    yield from self.release(wg, g - 1)
            for _ in range(3):  # the epilogue's three consumer barriers
                yield from self.named_barrier()

    def producer(self) -> Generator:
        for g in range(self.steps):
            st = g % self.S
            if g >= self.S:
                phase = g // self.S - 1
                yield lambda st=st, phase=phase: self.empty[st].ready(phase & 1, phase)
            self.issue(g, st)

    # -- the scheduler ----------------------------------------------------------------------
    def run(self, max_moves: int = 1_000_000):
        agents = [self.consumer(w) for w in range(self.wgs)] + ([self.producer()] if self.ws else [])
        waiting: List[Optional[Callable[[], bool]]] = [None] * len(agents)
        alive = list(range(len(agents)))
        for _ in range(max_moves):
            runnable = [i for i in alive if waiting[i] is None or waiting[i]()]
            choices = [("agent", i) for i in runnable] + [("event", j) for j in range(len(self.events))]
            if not choices:
                if alive:
                    raise ProtocolError(f"deadlock: agents {alive} blocked, no load or wgmma pending")
                break
            kind, k = self.rng.choice(choices)
            if kind == "event":  # a load lands, or a warpgroup's oldest wgmma batch completes
                self.events.pop(k)()
                continue
            try:
                waiting[k] = next(agents[k])
            except StopIteration:
                alive.remove(k)
        else:
            raise ProtocolError("no end after max_moves")
        if sorted(self.loaded) != list(range(self.steps)):
            raise ProtocolError("every step must be loaded exactly once")
        if self.consumed != [self.wgs] * self.steps:
            raise ProtocolError("every step must be consumed once by each consumer warpgroup")
        if self.events:
            raise ProtocolError("loads or wgmma left pending at the end")


def check(mode: str, stages: int, k_tiles: int, tiles: int, seed: int) -> None:
    Pipeline(mode, stages, k_tiles, tiles, random.Random(seed)).run()
