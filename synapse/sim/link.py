"""The host link as a fluid model: two directions, a shared duplex cap, copy engines.

Each copy first holds a copy engine for its fixed cost (``copy_latency_us`` per call),
then its bytes flow. Copies in one direction share that direction's bandwidth equally;
when both directions are busy the two together are capped at ``duplex_gb_per_s`` (on an
H100 both directions reach about 83 GB/s together, not 2 x 55), split in proportion to
the directions' own bandwidths. Rates are recomputed whenever a copy starts or ends, so
a copy's time is exact for piecewise-constant sharing, with one SimPy event per change.
"""

from __future__ import annotations

import functools

import simpy

from .profile import Link


class _Flow:
    __slots__ = ("direction", "remaining", "rate", "done", "tol")

    def __init__(self, direction: str, nbytes: float, done: simpy.Event):
        self.direction = direction
        self.remaining = float(nbytes)
        self.rate = 0.0
        self.done = done
        self.tol = 1e-9 * nbytes + 1e-6


class LinkModel:
    def __init__(self, env: simpy.Environment, link: Link):
        self.env = env
        self.bw = {"h2d": link.h2d_gb_per_s * 1e9, "d2h": link.d2h_gb_per_s * 1e9}
        self.duplex = link.duplex_gb_per_s * 1e9
        self.latency_s = link.copy_latency_us * 1e-6
        self.engines = simpy.Resource(env, capacity=link.copy_engines)
        self.flows: list[_Flow] = []
        self._last = 0.0
        self._version = 0
        self.bytes_moved = {"h2d": 0, "d2h": 0}

    def transfer(self, direction: str, nbytes: int, calls: int = 1, fixed_s: float | None = None):
        """SimPy process body: ``calls`` copies totalling ``nbytes`` in one direction;
        ``fixed_s`` (the predictor's) replaces ``calls * copy_latency_us`` when given."""
        fixed = calls * self.latency_s if fixed_s is None else fixed_s
        with self.engines.request() as req:
            yield req
            if calls and fixed:
                yield self.env.timeout(fixed)
            if nbytes > 0:
                flow = _Flow(direction, nbytes, self.env.event())
                self._advance()
                self.flows.append(flow)
                self._reschedule()
                yield flow.done
        self.bytes_moved[direction] += nbytes

    def rates(self, n_h2d: int, n_d2h: int) -> dict[str, float]:
        """Per-copy rate in each direction for the given numbers of active copies."""
        share = dict(self.bw)
        if n_h2d and n_d2h:
            total = self.bw["h2d"] + self.bw["d2h"]
            if total > self.duplex:
                share = {d: self.duplex * b / total for d, b in self.bw.items()}
        return {"h2d": share["h2d"] / max(1, n_h2d), "d2h": share["d2h"] / max(1, n_d2h)}

    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0:
            for f in self.flows:
                f.remaining -= f.rate * dt
        self._last = self.env.now

    def _reschedule(self) -> None:
        finished = [f for f in self.flows if f.remaining <= f.tol]
        if finished:
            self.flows = [f for f in self.flows if f.remaining > f.tol]
            for f in finished:
                f.done.succeed()
        if not self.flows:
            return
        n_h = sum(f.direction == "h2d" for f in self.flows)
        r = self.rates(n_h, len(self.flows) - n_h)
        for f in self.flows:
            f.rate = r[f.direction]
        dt = min(f.remaining / f.rate for f in self.flows)
        self._version += 1
        wake = self.env.timeout(dt)
        wake.callbacks.append(functools.partial(self._wake, self._version))

    def _wake(self, version: int, _event) -> None:
        if version != self._version:
            return  # a start or end since then rescheduled
        self._advance()
        self._reschedule()
