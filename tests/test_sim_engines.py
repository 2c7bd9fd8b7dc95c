"""The simulator's copy engines grant in exactly simpy.Resource's order: the same grants
at the same times, and every other event of the run in the same place, whatever the
contention (more copies than engines, requests and releases at the same instant)."""

from hypothesis import given, settings, strategies as st
import simpy

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
