"""A real Prometheus server scrapes a running TieredCache generate loop on the CPU, and
the hit counters are read back through Prometheus's HTTP query API.

Needs Debian's ``prometheus`` (the README's test command installs it); skipped with the
reason when it is missing or does not start. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import tiny_model  # noqa: E402

from synapse.hf import TieredCache  # noqa: E402
from synapse.monitor import serve  # noqa: E402
from synapse.monitor.metrics import REGISTRY  # noqa: E402

SCRAPE = "250ms"
HITS = 'synapse_block_hits_total{tier="l1"}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, expr: str):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(tmp_path):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("Debian's prometheus is not installed (the README's test command installs it)")
    srv = serve(port=0, memory_type=None)
    port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"global:\n  scrape_interval: {SCRAPE}\n  scrape_timeout: {SCRAPE}\n"
                   f"scrape_configs:\n  - job_name: synapse\n    static_configs:\n"
                   f"      - targets: ['127.0.0.1:{srv.port}']\n")
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([exe, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.skip(f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-400:]}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        srv.close()


def test_prometheus_scrapes_the_hit_counters_of_a_running_generate_loop(prometheus):
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    hits = {"l1": 0, "l2": 0}
    base = {t: REGISTRY.get_sample_value("synapse_block_hits_total", {"tier": t}) or 0.0
            for t in hits}
    seen_while_running = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # generate until Prometheus saw the counter move
        cache = TieredCache(model.config, policy="h2o", l1_budget_tokens=32, demote="int4",
                            block_tokens=8, model=model)
        ids = torch.randint(3, 96, (1, 40), generator=gen)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache,
                           prefill_chunk_size=16)
        t = cache.telemetry()
        hits["l1"] += t["l1_hits"]
        hits["l2"] += t["l2_hits"]
        # how often the stored value changed: Prometheus scraped the loop as it ran
        seen_while_running = _query(prometheus, f"changes({HITS}[5m])") or 0
        if seen_while_running >= 2:
            break
    assert seen_while_running >= 2, "Prometheus did not scrape changing values during the loop"
    assert hits["l2"] > 0  # the loop really used the second tier
    want = {t: base[t] + hits[t] for t in hits}
    assert REGISTRY.get_sample_value("synapse_block_hits_total", {"tier": "l1"}) == want["l1"]
    got = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the loop stopped: the next scrapes have the totals
        got = {t: _query(prometheus, f'synapse_block_hits_total{{tier="{t}"}}') for t in hits}
        if got == want:
            break
        time.sleep(0.2)
    assert got == want
