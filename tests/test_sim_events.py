"""The simulator's own event helpers keep simpy's order exactly: the copy engines grant
as simpy.Resource does and the ticket barrier triggers where simpy.AllOf does, so every
event of a run happens at the same time and in the same place as with simpy's classes
(contention, ties at one instant, events already processed, a failing event)."""

from hypothesis import given, settings, strategies as st
import simpy

from synapse.sim.backend import _AllDone
from synapse.sim.link import _Engines


def _trace(make_gate, capacity: int, jobs) -> list:
    """Run ``jobs`` ((start, hold) pairs, one process each) through a gate of
    ``capacity`` engines; log every grant and release, and a marker event per job
    scheduled at its grant (where simpy's order of same-time events shows)."""
    env = simpy.Environment()
    gate = make_gate(env, capacity)
    log = []

    def job(i, start, hold):
        yield env.timeout(start)
        req, release = gate(env, i)
        yield req
        log.append((env.now, "granted", i))
        marker = env.timeout(0)
        marker.callbacks.append(lambda _e, i=i: log.append((env.now, "marker", i)))
        yield env.timeout(hold)
        release()
        log.append((env.now, "released", i))

    for i, (start, hold) in enumerate(jobs):
        env.process(job(i, start, hold))
    env.run()
    return log


def _simpy_gate(env, capacity):
    res = simpy.Resource(env, capacity=capacity)

    def gate(env, i):
        req = res.request()
        return req, lambda: res.release(req)
    return gate


def _engines_gate(env, capacity):
    engines = _Engines(env, capacity)

    def gate(env, i):
        req = engines.request()
        return req, lambda: engines.release(req)
    return gate


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3),
       st.lists(st.tuples(st.sampled_from([0.0, 1.0, 2.0, 2.5]),
                          st.sampled_from([0.0, 0.5, 1.0, 1.5])), min_size=1, max_size=8))
def test_engines_grant_as_simpy_resource(capacity, jobs):
    expected = _trace(lambda env, c: _simpy_gate(env, c), capacity, jobs)
    assert _trace(lambda env, c: _engines_gate(env, c), capacity, jobs) == expected


def _barrier_trace(all_of, events_spec, waits) -> list:
    """Events at the times in ``events_spec`` (None: failing at time 1), waiters that
    start at a time and wait on a subset of them through ``all_of``; logs every
    resumption (and the error of a failed wait) with a marker scheduled there."""
    env = simpy.Environment()
    log = []
    events = []
    for i, at in enumerate(events_spec):
        ev = env.event()
        events.append(ev)

        def fire(_e, ev=ev, i=i, at=at):
            if at is None:
                ev.fail(RuntimeError(f"event {i}"))
                ev.defused = True  # a failure no waiter takes must not end the run
            else:
                ev.succeed(i)
        env.timeout(1.0 if at is None else at).callbacks.append(fire)

    def waiter(j, start, subset):
        yield env.timeout(start)
        try:
            yield all_of(env, [events[k] for k in subset])
            log.append((env.now, "done", j))
        except RuntimeError as e:
            log.append((env.now, "failed", j, str(e)))
        marker = env.timeout(0)
        marker.callbacks.append(lambda _e, j=j: log.append((env.now, "marker", j)))

    for j, (start, subset) in enumerate(waits):
        env.process(waiter(j, start, subset))
    env.run()
    return log


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, 2.0, None]), min_size=1, max_size=5).flatmap(
    lambda spec: st.tuples(st.just(spec), st.lists(st.tuples(
        st.sampled_from([0.0, 1.0, 1.5, 2.0]),
        st.lists(st.integers(0, len(spec) - 1), max_size=4, unique=True)),
        min_size=1, max_size=5))))
def test_barrier_triggers_as_simpy_all_of(case):
    spec, waits = case
    expected = _barrier_trace(lambda env, evs: env.all_of(evs), spec, waits)
    assert _barrier_trace(_AllDone, spec, waits) == expected
