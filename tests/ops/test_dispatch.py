"""The one kernel switch: a mode for every op, per-op overrides, errors that say what is wrong."""

import pytest
import torch

from hybridlm.ops import dispatch
from hybridlm.ops.dispatch import ENV, choose, kernels_mode, parse_setting, paths_used, reset_paths, use_kernels
from tests.helpers import requires_triton


@pytest.mark.parametrize(
    ("setting", "mode", "overrides"),
    [
        ("auto", "auto", ()),
        ("", "auto", ()),
        (" Torch ", "torch", ()),
        ("auto,add_rms_norm=torch", "auto", (("add_rms_norm", "torch"),)),
        ("ssd=torch", "auto", (("ssd", "torch"),)),
        ("torch, ssd = triton, causal_conv1d=auto", "torch", (("ssd", "triton"), ("causal_conv1d", "auto"))),
    ],
)
def test_settings_parse(setting, mode, overrides):
    assert parse_setting(setting) == (mode, overrides)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("fast", "'fast': expected one of auto, torch, triton first"),
        ("auto,torch", "'torch': expected one of auto, torch, triton first"),
        ("auto,flash=torch", "'flash' is not an op; ops: ssd, causal_conv1d"),
        ("auto,ssd=fast", "'ssd=fast': expected one of"),
    ],
)
def test_bad_settings_say_what_is_wrong(setting, message, monkeypatch):
    with pytest.raises(ValueError, match=message):
        dispatch.set_kernels(setting)
    monkeypatch.setenv(ENV, setting)
    with pytest.raises(ValueError, match=f"{ENV}="):
        kernels_mode()


def test_environment_overrides_reach_each_op(monkeypatch):
    monkeypatch.setenv(ENV, "torch,ssd=auto")
    assert kernels_mode() == "torch" and kernels_mode("ssd") == "auto" and kernels_mode("causal_conv1d") == "torch"
    with use_kernels("auto"):  # the Python switch wins over the environment, then gives way again
        assert kernels_mode("causal_conv1d") == "auto"
    assert kernels_mode("causal_conv1d") == "torch"


def test_use_kernels_restores_an_earlier_set_kernels_setting(monkeypatch):
    """Guards against use_kernels() undoing an earlier set_kernels() (restoring None, not the previous setting)."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(dispatch, "_mode", None)  # set_kernels's setting goes back when the test ends
    dispatch.set_kernels("torch,ssd=auto")
    with use_kernels("auto"):
        assert kernels_mode("causal_conv1d") == "auto"
    assert kernels_mode() == "torch" and kernels_mode("ssd") == "auto" and kernels_mode("causal_conv1d") == "torch"


@requires_triton
def test_an_override_decides_that_ops_path():
    """``triton`` forces the kernels (on CPU tensors: the interpreter's setting, how CPU tests run them); one op
    held on the reference."""
    x = torch.zeros(2, device="cuda" if torch.cuda.is_available() else "cpu")
    reset_paths()
    with use_kernels("triton,add_rms_norm=torch"):
        assert choose("add_rms_norm", x) == "torch"
        assert choose("gated_rms_norm", x) == "triton"
    assert paths_used() == {"add_rms_norm": "torch", "gated_rms_norm": "triton"}


def test_auto_sends_float64_cuda_inputs_to_the_reference(monkeypatch):
    """The kernels accumulate in float32: a float64 model on CUDA ran them under ``auto`` and lost its precision.
    Stand-ins for CUDA tensors (``choose`` reads ``is_cuda`` and ``dtype``), so the rule is checked without a GPU."""
    from types import SimpleNamespace

    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    cuda32, cuda64 = (SimpleNamespace(is_cuda=True, dtype=d) for d in (torch.float32, torch.float64))
    reset_paths()
    with use_kernels("auto"):
        assert choose("ssd", cuda32, cuda32, None) == "triton"
        assert choose("ssd_step", cuda32, cuda64, None) == "torch"  # one float64 input is enough (a float64 state)
        assert choose("gated_rms_norm", cuda64) == "torch"
    with use_kernels("triton"):  # forcing the kernels still runs them (their tests feed them float64)
        assert choose("rms_norm", cuda64) == "triton"
    assert paths_used() == {"ssd": "triton", "ssd_step": "torch", "gated_rms_norm": "torch", "rms_norm": "triton"}


def test_auto_sends_a_float64_initial_state_of_a_scan_to_the_reference(monkeypatch):
    """A float32 model decoding with a float64 cache prefills its scans from the cache's float64 state: ``ssd``
    and ``gated_delta`` chose their path from x, dt, B, C (q, k, v) only, so on CUDA the kernels (float32) took
    the float64 state, while the steps after them, which see the state, ran in float64. Stand-ins for CUDA
    tensors in ``choose``'s place (the answer is recorded; the reference runs)."""
    from types import SimpleNamespace

    from hybridlm.ops import gated_delta, ssd

    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    chosen = {}

    def as_on_cuda(op, *tensors):
        cuda = [t if t is None else SimpleNamespace(is_cuda=True, dtype=t.dtype) for t in tensors]
        chosen[op] = choose(op, *cuda)
        return "torch"

    monkeypatch.setattr(ssd, "choose", as_on_cuda)
    monkeypatch.setattr(gated_delta, "choose", as_on_cuda)
    g = torch.Generator().manual_seed(0)
    b, L, h, p, n = 1, 4, 2, 3, 4
    x, dt = torch.randn(b, L, h, p, generator=g), torch.rand(b, L, h, generator=g)
    B, C = torch.randn(b, L, 1, n, generator=g), torch.randn(b, L, 1, n, generator=g)
    ssd.ssd_chunked(x, dt, -torch.rand(h), B, C, 4, initial_state=torch.zeros(b, h, p, n, dtype=torch.float64))
    q, k, v = (torch.randn(b, L, h, 4, generator=g) for _ in range(3))
    gate, beta = -torch.rand(b, L, h, generator=g), torch.rand(b, L, h, generator=g)
    state = torch.zeros(b, h, 4, 4, dtype=torch.float64)
    gated_delta.gated_delta_rule_chunked(q, k, v, gate, beta, 4, initial_state=state)
    assert chosen == {"ssd": "torch", "gated_delta": "torch"}


@pytest.mark.gpu
def test_a_float64_model_on_cuda_runs_only_the_references():
    """Under ``auto`` a float64 model on CUDA runs the references, whose float64 the kernels would lose, and
    attention on SDPA's math backend: it found "No available kernel" (cuDNN, flash and memory-efficient
    attention take no float64) and would have run packed rows through FlexAttention. Its logits are the
    CPU's to float64 rounding, packed rows or not."""
    from hybridlm import HybridLM
    from tests.helpers import tiny_config

    model = HybridLM(tiny_config("MG*-", head_dim=16), seed=0, dtype=torch.float64)  # heads FlexAttention takes
    ids = torch.randint(0, 97, (2, 9))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 4 + [1] * 5])
    with torch.no_grad():
        want = [model(ids).logits, model(ids, doc_ids=doc_ids).logits]
    model.cuda()
    for packed, attention in ((None, "sdpa_math"), (doc_ids, "sdpa_dense_mask")):
        reset_paths()
        with use_kernels("auto"), torch.no_grad():
            got = model(ids.cuda(), doc_ids=None if packed is None else packed.cuda()).logits
        used = paths_used()
        assert used.get("mamba2_core") == used.get("gated_delta") == used.get("rms_norm") == "torch", used
        assert used["attention"] == attention and "triton" not in used.values(), used
        torch.testing.assert_close(got.cpu(), want[packed is not None], rtol=0, atol=1e-10)


@requires_triton
def test_forced_triton_on_the_cpu_outside_the_interpreter_is_refused_by_name(monkeypatch, tmp_path, capsys):
    """Triton failed inside the first launch ("0 active drivers"), after a run had started; the CLI
    called it an unexpected error."""
    from hybridlm import ConfigError
    from hybridlm.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_kernels("auto,ssd=triton"):
        dispatch.check_device("cpu")  # a per-op override is checked at its op, if the model runs it
        with pytest.raises(ConfigError, match="'triton' for ssd on CPU tensors: Triton's kernels run on CUDA"):
            choose("ssd", torch.zeros(1))
        assert choose("causal_conv1d", torch.zeros(1)) == "torch"
    with use_kernels("auto,attention=triton,moe_experts=triton"):  # no Triton kernels: "not torch" only
        dispatch.check_device("cpu")
    with use_kernels("triton"):
        with pytest.raises(ConfigError, match="'triton' for every op on cpu"):
            dispatch.check_device(torch.device("cpu"))
        dispatch.check_device("cuda")  # fine: what CUDA runs is the kernels' business
    monkeypatch.setenv(ENV, "triton")
    run = ["train", "--run-dir", str(tmp_path / "run"), "--set", "train.steps=1", "--set", "train.device=cpu"]
    assert main(run) == 2  # the device pinned: on a machine with CUDA the default run would take the GPU
    assert "'triton' for every op on cpu" in capsys.readouterr().err and not (tmp_path / "run").exists()
    for on in ("1", "true"):  # the interpreter runs them on CPU tensors (how the tests run them)
        monkeypatch.setenv("TRITON_INTERPRET", on)
        dispatch.check_device("cpu")


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "no-such-model", "--prompt", "x"],  # refused before the model is looked for
        ["plan", "--preset", "tiny", "--pp", "2", "--measure", "cpu"],
    ],
)
def test_a_malformed_setting_is_a_config_error_wherever_a_run_starts(argv, monkeypatch, capsys):
    """generate and plan --measure called it an unexpected ValueError ("this may be a bug in hybridlm");
    train refused it by name."""
    from hybridlm import ConfigError
    from hybridlm.cli import main

    monkeypatch.setenv(ENV, "auto,foo=torch")
    with pytest.raises(ConfigError, match=r"^HYBRIDLM_KERNELS: 'foo' is not an op"):
        dispatch.check_device("cpu")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: HYBRIDLM_KERNELS: 'foo' is not an op" in err and "unexpected" not in err


def test_rms_norm_reports_the_reference_it_runs_for_training():
    """The forward-only kernel is skipped when a gradient is wanted; that call recorded nothing, so paths_used()
    kept whatever an earlier inference call had recorded (``triton`` under a forced setting)."""
    from hybridlm.ops.norm import rms_norm

    x, w = torch.randn(3, 8, requires_grad=True), torch.ones(8)
    reset_paths()
    with use_kernels("triton"):
        rms_norm(x, w, 1e-5)
    assert paths_used() == {"rms_norm": "torch"}
