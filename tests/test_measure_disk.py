"""The disk measurement used by ``synapse calibrate`` and the prefix benchmark."""

from synapse.hw.measure_disk import MiB, ColdFile, disk_sweep


def test_disk_sweep_reports_a_read_and_write_rate_and_removes_its_files(tmp_path):
    r = disk_sweep(tmp_path, sizes=(MiB, 2 * MiB), repeats=1)
    assert r["read"]["bytes"] == [MiB, 2 * MiB] and len(r["read"]["seconds"]) == 2
    assert r["read_gb_per_s"] > 0 and r["write_gb_per_s"] > 0
    assert r["method"] in ("o_direct", "fadvise_dontneed")
    assert list(tmp_path.iterdir()) == []


def test_cold_file_reads_its_whole_file_each_call_and_is_removed_on_close(tmp_path):
    with ColdFile(tmp_path, nbytes=2 * MiB) as f:
        assert f.path.stat().st_size == 2 * MiB
        rates = [f.read_gb_per_s() for _ in range(2)]
        assert all(r > 0 for r in rates)
    assert list(tmp_path.iterdir()) == []
