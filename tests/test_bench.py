import json

from pertoken.bench import markdown_table, measure, pin_threads, write_results


def test_measure_runs_warmup_plus_repeats_and_takes_medians():
    calls = []
    result = measure(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7
    assert len(result["wall_s"]) == len(result["cpu_s"]) == 5
    assert sorted(result["wall_s"])[2] == result["median_wall_s"]


def test_markdown_table_and_results_files(tmp_path):
    table = markdown_table([{"a": 1, "b": 0.123456}, {"a": 2}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| 2 |  |"]
    path = write_results(tmp_path, "x", {"k": 1}, table)
    assert json.loads(path.read_text()) == {"k": 1}
    assert (tmp_path / "x.md").read_text() == table


def test_pin_threads_sets_torch_threads():
    import torch

    before = torch.get_num_threads()
    try:
        assert pin_threads(1) == 1
    finally:
        torch.set_num_threads(before)


def test_environment_names_the_cpu_and_its_kernel_flags(monkeypatch, tmp_path):
    from pathlib import Path

    from pertoken import bench

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2.80GHz\n"
                    "flags\t\t: fpu avx2 avx512f avx512_vnni sse4_2\n")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text",
                        lambda self, *a, **k: real(fake) if str(self) == "/proc/cpuinfo"
                        else real(self, *a, **k))
    assert bench.cpu_model() == ("Some CPU @ 2.80GHz", ["avx2", "avx512f", "avx512_vnni"])
    env = bench.environment()
    assert env["cpu_model"] == "Some CPU @ 2.80GHz" and env["cpu_flags"] == ["avx2", "avx512f",
                                                                             "avx512_vnni"]
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError()))
    assert bench.cpu_model() == (None, [])
