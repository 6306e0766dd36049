"""The statistics and profile arithmetic of benchmarks/train_step.py, generate.py's CPU table, the kernel scripts'
--check verdicts and gpu_session.sh's stage status (pure functions, printed arithmetic and exit codes; the GPU runs
are not tested here)."""

from __future__ import annotations

import importlib.util
import math
import random
import statistics
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def ts():
    spec = importlib.util.spec_from_file_location("train_step_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_median_interval_ranks(ts):
    # Binomial(24, 1/2): P(X <= 6) = 0.011 <= 0.025 < P(X <= 7) = 0.032, so the 7th and 18th values.
    assert ts.median_interval(list(range(24))) == (6, 17)
    assert ts.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few values: the whole range


def test_each_variant_runs_its_float8_setting(ts):
    assert ts.float8_of("unfused", "rowwise") == ("none", False)
    assert ts.float8_of("fused-float8", "rowwise") == ("rowwise", False)
    assert ts.float8_of("unfused-float8-filtered", "tensorwise") == ("tensorwise", True)


def test_the_planned_memory_beside_each_variant_is_hybridlm_plans(ts):
    """The ``planned GiB`` column: the peak ``hybridlm plan`` gives the same step on one rank (float8 and block-level
    checkpointing as the variant runs them; one micro-batch, no gradients at the peak); none for a checkpointing
    policy the planner does not model."""
    from hybridlm import ModelConfig
    from hybridlm.plan import plan_pipeline

    config = ModelConfig.preset("bench-1.3b")
    one = dict(grads_at_peak=False)
    plain = plan_pipeline(config, 1, seq_len=4096, micro_batch_size=4).rank_memory(**one)[0]["peak_bytes"]
    assert ts.planned_gib(config, 4, 4096, None, ("none", False)) == plain / 2**30
    f8 = plan_pipeline(config, 1, seq_len=4096, micro_batch_size=4, float8="rowwise", float8_auto_filter=True)
    assert ts.planned_gib(config, 4, 4096, None, ("rowwise", True)) == f8.rank_memory(**one)[0]["peak_bytes"] / 2**30
    full = plan_pipeline(config, 1, seq_len=4096, micro_batch_size=4, recompute=True).rank_memory(**one)[0]
    assert ts.planned_gib(config, 4, 4096, "full", ("none", False)) == full["peak_bytes_ckpt"] / 2**30 < plain / 2**30
    assert ts.planned_gib(config, 4, 4096, "selective", ("none", False)) is None


def test_intervals_cover_the_true_centre(ts):
    rng = random.Random(0)
    trials, n = 2000, 24
    hits_median = hits_mean = 0
    for _ in range(trials):
        xs = [rng.gauss(1.0, 0.01) for _ in range(n)]
        lo, hi = ts.median_interval(xs)
        hits_median += lo <= 1.0 <= hi
        _, mlo, mhi = ts.mean_interval(xs)
        hits_mean += mlo <= 1.0 <= mhi
    assert hits_median / trials >= 0.95  # exact order statistics: at least the nominal coverage
    assert 0.92 <= hits_mean / trials <= 0.97  # normal approximation with n = 24: close to 95 %


def test_mean_interval_values(ts):
    xs = [1.0, 2.0, 3.0, 4.0]
    mean, lo, hi = ts.mean_interval(xs)
    half = 1.959964 * statistics.stdev(xs) / 2
    assert mean == 2.5 and math.isclose(lo, 2.5 - half, rel_tol=1e-6) and math.isclose(hi, 2.5 + half, rel_tol=1e-6)


def test_gpu_idle_attributes_gaps_to_the_host_op(ts):
    kernels = [(0.0, 10.0, "a"), (12.0, 20.0, "b"), (15.0, 30.0, "c"), (100.0, 110.0, "d")]
    host = [(25.0, 120.0, "aten::item"), (40.0, 90.0, "aten::copy_")]
    idle, gaps = ts.gpu_idle(kernels, host)
    # a->b: 2 µs, a launch gap; c covers b, so the next gap runs from 30 to 100 (midpoint 65: both host ops
    # run, the shorter one is named).
    assert idle == 72.0
    assert gaps == [(2.0, 10.0, "a", "b", "(launch)"), (70.0, 30.0, "c", "d", "aten::copy_")]
    assert ts.gpu_idle([(0.0, 1.0, "a"), (50.0, 51.0, "b")], [])[1][0][4] == "(Python)"


def test_warnings_by_site_counts_each_call_site(ts):
    import warnings

    def sync_like():
        warnings.warn("called a synchronizing CUDA operation\nsecond line", UserWarning, stacklevel=1)

    with ts.warnings_by_site() as sites:
        for _ in range(3):
            sync_like()
        warnings.warn("another", stacklevel=1)
    assert sum(sites.values()) == 4
    (first, n), (second, m) = sorted(sites.items(), key=lambda kv: -kv[1])
    assert n == 3 and first[0] == "called a synchronizing CUDA operation"
    assert first[1].startswith("test_benchmarks.py:") and "sync_like" in first[1]
    assert m == 1 and second[0] == "another"
    with warnings.catch_warnings(record=True) as after:  # the handler is gone again
        warnings.simplefilter("always")
        warnings.warn("outside", stacklevel=1)
    assert len(after) == 1 and sum(sites.values()) == 4


def test_generate_speed_up_column_divides_the_unrounded_totals(monkeypatch, capsys):
    """benchmarks/generate.py's CPU table: each row's speed-up is the no-cache total over its own, as the
    end-to-end line says; divided by the table's two-decimal "total s" instead, a short run printed the
    no-cache row 1.1x faster than itself and the cache row 2.2x for 1.8x."""
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("generate_bench", _PATH.parent / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    stats = {"prefill_tokens": 8, "prefill_seconds": 0.01, "decode_tokens": 3, "decode_seconds": 0.01}
    monkeypatch.setattr(gen, "ours", lambda model, prompt, new_tokens, **kw: ([1, 2, 3, 4], dict(stats)))
    clock = iter([0.0, 0.0249, 1.0, 1.0449])  # totals 0.0249 s (cache) and 0.0449 s (no cache)
    monkeypatch.setattr(gen, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(gen.torch, "set_num_threads", lambda n: None)
    gen.cpu_bench(SimpleNamespace(threads=1, prompt_len=8, new_tokens=4))
    table = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = {cells[1].strip(): cells[4:6] for cells in table}
    assert [c.strip() for c in rows["cache"]] == ["0.02", "1.8x"]
    assert [c.strip() for c in rows["no cache"]] == ["0.04", "1.0x"]


def test_two_gpu_runs_train_one_model_in_every_layout():
    """benchmarks/two_gpu.sh compares the losses of one model trained in several layouts: each pattern (fused or
    not, cut by '|' into stages) must hold the same layers, on the GPU those of bench-1.3b. The GPU's fused patterns
    wrote ``[M-][M-][M-][M-]*-`` for ``M-M-M-M*-``: two MLP layers more (1.319 B parameters for 1.252 B)."""
    import re

    from hybridlm import ModelConfig

    script = (_PATH.parent / "two_gpu.sh").read_text()
    found = re.findall(r"^\s*(unfused|fused|inter_unfused|inter_fused)='([^']*)'", script, re.M)
    names = ["unfused", "fused", "inter_unfused", "inter_fused"]
    assert [name for name, _ in found] == names * 2  # the rehearsal's, then the GPU's
    rehearsal, gpu = dict(found[:4]), dict(found[4:])
    for patterns, model in ((rehearsal, "M-M-*-M-M-M-"), (gpu, ModelConfig.preset("bench-1.3b").pattern)):
        for name, pattern in patterns.items():
            assert re.sub(r"[\[\]|]", "", pattern) == model, (name, pattern, model)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", _PATH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_gpu(monkeypatch, module) -> None:
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module.torch.cuda, "get_device_name", lambda *a: "fake GPU")


@pytest.mark.parametrize("bad", [2.5, float("nan")])
def test_gdn_check_exits_1_over_the_bar(monkeypatch, capsys, bad):
    """gdn_kernel.py --check printed the error ratios and exited 0 whatever they were: a kernel failing
    issue 8's bar of 2 (or giving NaN gradients) passed a scripted session unnoticed."""
    gdn = _load("gdn_kernel")
    _fake_gpu(monkeypatch, gdn)
    monkeypatch.setattr(sys, "argv", ["gdn_kernel.py", "--check", "--no-bench"])
    monkeypatch.setattr(gdn, "error_ratios", lambda packed: {"o": 1.1, "k": bad if packed else 1.2})
    with pytest.raises(SystemExit) as exit_:
        gdn.main()
    assert exit_.value.code == 1
    assert "FAIL" in capsys.readouterr().out
    monkeypatch.setattr(gdn, "error_ratios", lambda packed: {"o": 1.1, "k": 2.0})
    gdn.main()  # within the bar: no exit
    assert capsys.readouterr().out.rstrip().endswith("PASS")


def test_conv_norm_check_judges_the_ratios_and_exits_1(monkeypatch):
    """conv_norm_kernels.py --check printed the ratios and never failed (docs/benchmarks.md reported
    "(PASS)", which the script never printed): a wrong kernel's ratio is now judged against the bar of 2
    and the script exits 1."""
    from hybridlm.ops.conv import causal_conv1d_reference

    cn = _load("conv_norm_kernels")
    torch = cn.torch
    torch.manual_seed(0)
    exact = [torch.randn(1, 64, 8), torch.randn(8, 1, 4) / 2, torch.randn(8) / 4]

    def ref(x, w, b):
        return causal_conv1d_reference(x, w, b, None, "silu")

    labels = ["out", "dx", "dw", "db"]
    good = cn.case_ratios(ref, ref, exact, labels)  # the reference itself in bf16: about one rounding
    assert [r[0] for r in good] == labels and all(cn.passes(r[3]) for r in good), good
    wrong = cn.case_ratios(lambda x, w, b: ref(x, w, b) * 1.05, ref, exact, labels)
    assert not cn.passes(wrong[0][3])
    assert not cn.passes(float("nan"))
    _fake_gpu(monkeypatch, cn)
    monkeypatch.setattr(sys, "argv", ["conv_norm_kernels.py", "--check"])
    monkeypatch.setattr(cn, "check", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        cn.main()
    assert exit_.value.code == 1


def test_conv_norm_timing_clears_gradients_between_calls():
    """conv_norm_kernels.py timed forward + backward with every call's gradients added into the inputs'
    ``.grad`` (a read and write of a gradient as large as the input, inside the timed time); ssd_kernel.py
    and mixers.py clear them first, as a training step's zero_grad does."""
    cn = _load("conv_norm_kernels")
    torch = cn.torch
    x = torch.ones(3, requires_grad=True)
    step = cn.backward_step(lambda t: 2 * t, [x], [torch.ones(3)])
    step()
    step()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]


def test_generate_cpu_mode_exits_1_when_the_cache_changes_the_tokens(monkeypatch, capsys):
    """generate.py's CPU mode checks the cached tokens against the no-cache loop's; it printed "NO" and
    exited 0 when they differed."""
    gen = _load("generate")
    stats = {"prefill_tokens": 8, "prefill_seconds": 0.01, "decode_tokens": 3, "decode_seconds": 0.01}
    monkeypatch.setattr(
        gen, "ours", lambda model, prompt, n, use_cache=True, **kw: ([1, 2, 3] if use_cache else [1, 2, 4], dict(stats))
    )
    monkeypatch.setattr(gen.torch, "set_num_threads", lambda n: None)
    assert gen.main(["--prompt-len", "8", "--new-tokens", "3"]) == 1
    assert "same tokens: NO" in capsys.readouterr().out
    monkeypatch.setattr(gen, "ours", lambda model, prompt, n, **kw: ([1, 2, 3], dict(stats)))
    assert gen.main(["--prompt-len", "8", "--new-tokens", "3"]) == 0


@pytest.mark.parametrize(
    ("stage", "failing"), [("kernels", "gdn_kernel.py"), ("ssdk", "ssd_kernel.py"), ("convk", "conv_norm")]
)
def test_gpu_session_stage_reports_a_failed_check(tmp_path, stage, failing):
    """gpu_session.sh chained each ``--check`` and the timing with ``;``, so a stage's printed rc was its last
    command's: a failed kernel check showed as ``rc 0``."""
    import os
    import subprocess

    stubs = tmp_path / "bin"
    stubs.mkdir()
    # python3: fails the one check asked to fail, succeeds otherwise; nvidia-smi: a no-op.
    (stubs / "python3").write_text(f'#!/bin/sh\ncase "$*" in *{failing}*--check*) echo FAIL; exit 1;; esac\nexit 0\n')
    (stubs / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", OUT=str(tmp_path / "out"))
    script = _PATH.parent / "gpu_session.sh"
    out = subprocess.run(
        ["bash", str(script), "--no-install", stage], env=env, cwd=_PATH.parents[1], capture_output=True, text=True
    ).stdout
    assert f"=== {stage} (rc 1," in out, out
    (stubs / "python3").write_text("#!/bin/sh\nexit 0\n")
    out = subprocess.run(
        ["bash", str(script), "--no-install", stage], env=env, cwd=_PATH.parents[1], capture_output=True, text=True
    ).stdout
    assert f"=== {stage} (rc 0," in out, out


def test_prepare_throughput_compares_the_one_at_a_time_path_with_the_same_files(tmp_path):
    """prepare_throughput.py's "one at a time" variant is the path before batching: it must write the very files
    `prepare_corpus` writes, or its row compares against something else."""
    from hybridlm.train.data import prepare_corpus
    from hybridlm.train.tokenizer import ByteTokenizer

    bench = _load("prepare_throughput")
    bench.corpus(tmp_path / "c.jsonl", 0.05)
    assert (tmp_path / "c.jsonl").stat().st_size > 50_000
    source, tok = str(tmp_path / "c.jsonl"), ByteTokenizer()
    meta = bench.one_at_a_time(source, tmp_path / "old", tok)
    assert prepare_corpus(source, tmp_path / "new", tok)[1] == meta
    for f in (tmp_path / "old").iterdir():
        assert (tmp_path / "new" / f.name).read_bytes() == f.read_bytes(), f.name


def test_serve_times_continuous_batching_beside_static_and_checks_the_texts(capsys):
    """serve.py's continuous setting runs (staggered, streamed requests of mixed lengths) and answers the same texts
    as one request at a time; its table has a row per setting, the p90 latency and the time to first text."""
    serve = _load("serve")
    args = ["--clients", "3", "--max-tokens", "4", "--prompt-len", "8", "--repeat", "1", "--continuous"]
    assert serve.main([*args, "--stagger", "0.01", "--spread", "--stream"]) == 0
    out = capsys.readouterr().out
    assert "| 3 | continuous | no | " in out and "| 3 | static | no | " in out and "p90 latency s" in out
    assert "mean time to first text s" in out
    assert "same texts in every round of every setting: yes" in out
    assert [serve.lengths_for(8, i, True) for i in range(5)] == [2, 4, 6, 8, 2]


def test_serve_scores_questions_of_several_choices_with_their_shared_prefixes_run_once_and_per_prompt(capsys):
    """serve.py --score --choices: prompts in questions that share all but their last characters; the table times the
    shared prefixes run once and run per prompt, with the same texts, and leaves the library's threshold as it was."""
    from hybridlm.infer import prefixes

    serve = _load("serve")
    texts = serve.prompts(6, 80, 3)
    assert [len(t) for t in texts] == [80] * 6 and len(set(texts)) == 6
    assert texts[0][:72] == texts[2][:72] != texts[3][:72] == texts[5][:72]
    assert prefixes.shared_prefixes([list(t.encode()) for t in texts], 64) == [(72, [0, 1, 2]), (72, [3, 4, 5])]
    args = ["--clients", "6", "--prompt-len", "80", "--repeat", "1", "--score", "--choices", "3"]
    assert serve.main(args) == 0
    out = capsys.readouterr().out
    assert "| 6 | static | no | run once, kept | " in out and "| 6 | static | no | run per prompt | " in out
    assert "| 6 | static | no | run once per batch | " in out and "| 1 | static | no | run once, kept | " in out
    assert "same texts in every round of every setting: yes" in out
    assert prefixes.SHARED_PREFIX == 64
    assert serve.main(["--clients", "2", "--n", "3", "--prompt-len", "70", "--max-tokens", "2", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 6 | static | no | run once, kept | " in out and "| 6 | static | no | run per prompt | " in out
    assert "3 choices per request (n)" in out and "same texts in every round of every setting: yes" in out


def test_cli_generate_times_the_command_with_its_defaults_and_without_graphs(capsys):
    """cli_generate.py runs ``hybridlm generate`` as a process per setting and prints a row for each, with the decode
    rate the command printed and whether its text equals the default's (on the CPU both settings run eagerly)."""
    bench = _load("cli_generate")
    args = ["--device", "cpu", "--preset", "tiny", "--dtype", "float32", "--rounds", "1", "--new-tokens", "3"]
    assert bench.main([*args, "--batch", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 prompt |")]
    assert [row.split(" | ")[1] for row in rows] == ["default", "--no-cuda-graph"]
    assert all(row.endswith("| yes |") and float(row.split(" | ")[3].replace(",", "")) > 0 for row in rows), rows


def test_generate_times_each_sampling_setting_against_greedy(capsys):
    """generate.py --sampling-cost: a row per sampling setting (the penalties, a logit bias, top-p by the kernel's
    dispatch and by sorting, min_p), greedy's ratio 1, and whether the two top-p paths sampled the same tokens."""
    bench = _load("generate")
    assert bench.main(["--sampling-cost", "1", "--batches", "2", "--prompt-len", "8", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x |" in line]
    assert [row.split(" | ")[0][2:] for row in rows] == [name for name, _, _ in bench.SAMPLING_SETTINGS]
    assert rows[0].endswith("| 1.000x |")
    assert "top-p without sorting against sorting: the same tokens: yes" in out


def test_generate_mtp_cost_forces_every_draft_kept_or_refused(capsys):
    """generate.py --mtp-cost: the rounds forced to keep every draft report 100 % acceptance, those forced to keep none
    0 %, each with a break-even count against plain decoding; the patch on the sampler is undone after."""
    from hybridlm.infer.speculative import _Picks

    verify = _Picks.verify
    bench = _load("generate")
    assert bench.main(["--mtp-cost", "2", "--rounds", "1", "--prompt-len", "8", "--new-tokens", "9"]) == 0
    assert _Picks.verify is verify
    rows = {
        cells[1].strip(): [c.strip() for c in cells[2:-1]]
        for cells in (line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| "))
    }
    assert rows["plain, eager"][2] == "" and float(rows["plain, eager"][0].replace(",", "")) > 0
    for k in ("1 draft", "2 drafts"):
        right, wrong = rows[f"speculative, {k} a round, all right"], rows[f"speculative, {k} a round, all wrong"]
        assert (right[2], wrong[2]) == ("100.0%", "0.0%"), (right, wrong)
        assert float(right[3]) > -1 and float(wrong[3]) > -1


def test_prefill_cost_fits_a_forwards_fixed_cost_and_its_rate():
    """prefill_cost.py's fit recovers a known line (2 ms per forward + 10,000 positions per second), and the script
    prints its table and the fit for tiny shapes."""
    bench = _load("prefill_cost")
    shapes = [(1, 1), (1, 100), (4, 100), (8, 400)]
    fixed, rate = bench.fit(shapes, [0.002 + r * p / 10_000 for r, p in shapes])
    assert abs(fixed - 0.002) < 1e-9 and abs(rate - 10_000) < 1e-3
    assert bench.main(["--rows", "1", "2", "--positions", "1", "4", "--repeat", "1"]) == 0


def test_step_kernel_times_each_tile_setting_and_checks_it_computes_what_the_first_does(monkeypatch, capsys):
    """benchmarks/step_kernel.py, with the kernel in the interpreter on CPU tensors and each timed graph replaced by
    one call: a row per setting, the first the baseline, each one's y and state compared with the first's, and the
    kernel's own setting put back. A setting that computed something else would print **no**."""
    monkeypatch.syspath_prepend(str(_PATH.parent))  # (it imports top_p's timing)
    spec = importlib.util.spec_from_file_location("step_kernel_bench", _PATH.parent / "step_kernel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from hybridlm.ops import step_triton

    make = bench.inputs
    monkeypatch.setattr(bench, "inputs", lambda rows: make(rows, "cpu"))
    monkeypatch.setattr(bench, "graph_ms", lambda call, reps: (call(), 0.002)[1])
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "cpu")
    monkeypatch.setattr(sys, "argv", ["step_kernel.py", "--settings", "64x4", "16x8", "--rows", "1", "--rounds", "1"])
    bench.main()
    table = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 ")]
    assert [[c.strip() for c in row] for row in table] == [
        ["1", "64 x 4", "64", "2.00", f"{2 * 64 * 64 * 128 * 4 / 2.0 / 1e3:,.0f}", "1.000×", "yes"],
        ["1", "16 x 8", "256", "2.00", f"{2 * 64 * 64 * 128 * 4 / 2.0 / 1e3:,.0f}", "1.000×", "yes"],
    ]
    assert (step_triton.SSD_STEP_BLOCK_P, step_triton.SSD_STEP_WARPS) == (64, 4)


def test_plan_vs_measure_costs_every_layout_with_the_measured_times(capsys):
    """benchmarks/plan_vs_measure.py on the CPU: every block kind's two times, and the three layouts judged by the
    measured times, the measured plan being the best of them (ratio 1.000) and no layout beating it."""
    spec = importlib.util.spec_from_file_location("plan_vs_measure", _PATH.parent / "plan_vs_measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--preset", "tiny", "--pp", "2", "--seq-len", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    kinds = ["M", "-", "*-", "G", "ME", "*", "E", "embedding", "head", "mtp depth"]
    assert all(any(line.split()[: len(k.split())] == k.split() for line in out.splitlines()) for k in kinds), out
    layouts = [line for line in out.splitlines() if line.startswith(("planned from", "even split"))]
    assert len(layouts) == 3 and layouts[1].endswith("1.000"), out
    assert all(float(line.split()[-1]) >= 1.0 for line in layouts), out


def test_saved_bytes_measures_each_block_kind_beside_the_plans_count(monkeypatch):
    """benchmarks/saved_bytes.py's rows: one per distinct block kind, in pattern order, both sides positive (eager
    blocks here; the comparison with compiled ones is tests/plan/test_cost.py's)."""
    monkeypatch.syspath_prepend(str(_PATH.parent))  # (it imports knobs' model_fields)
    spec = importlib.util.spec_from_file_location("saved_bytes_bench", _PATH.parent / "saved_bytes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from tests.helpers import tiny_config

    config = tiny_config("M-M*-[*-]", vocab_size=64)
    rows = module.rows(config, 1, 16, "cpu", compiled=False, float8="none", auto_filter=False)
    assert [kind for kind, _, _ in rows] == ["M", "-", "*", "*-"]
    assert all(got > 0 and want > 0 for _, got, want in rows)
    # --frozen: the same kinds, frozen behind a trained MLP (not shown), each keeping less on both sides
    frozen = module.rows(config, 1, 16, "cpu", compiled=False, float8="none", auto_filter=False, frozen=True)
    assert [kind for kind, _, _ in frozen] == ["M", "-", "*", "*-"]
    assert all(0 < got < a and 0 < want < b for (_, got, want), (_, a, b) in zip(frozen, rows)), (frozen, rows)


def test_frozen_step_times_each_trainable_setting_beside_the_plans_ratios(monkeypatch, capsys):
    """benchmarks/frozen_step.py on the CPU: a row per default setting (everything, the layers, their second half, the
    last layer, the MTP depths), the first the ratios' base, and the plan's FLOPs below it for every frozen one."""
    monkeypatch.syspath_prepend(str(_PATH.parent))  # (it imports knobs' model_fields)
    spec = importlib.util.spec_from_file_location("frozen_step_bench", _PATH.parent / "frozen_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--preset", "tiny", "--pattern=----/-", "--shape", "1x16", "--device", "cpu", "--steps", "1"])
    rows = [
        line.split(" | ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    names = [row[0].removeprefix("| ") for row in rows[1:]]
    assert names == ["everything", "layers.*", "layers.2.*,layers.3.*", "layers.3.*", "mtp.*"], rows
    assert rows[1][3:] == ["1.000", "1.000", "1.000", "n/a", "1.000 |"] and rows[1][2] == "n/a", rows  # (no peak)
    assert all(float(row[5]) < 1 and float(row[-1].rstrip(" |")) < 1 for row in rows[2:]), rows  # (FLOPs, memory)
