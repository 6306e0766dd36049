"""RunConfig: TOML, --set overrides, field-named errors."""

import os
import re

import pytest

from hybridlm import ConfigError
from hybridlm.train.config import DEFAULT_MODEL, RunConfig
from tests.helpers import MLA_TINY, fifos_never_read


def test_defaults_are_valid_and_round_trip(tmp_path):
    run = RunConfig()
    run.validate()
    assert run.model == DEFAULT_MODEL and "[" in run.model["pattern"]  # the default fuses layers
    (tmp_path / "run.toml").write_text(run.to_toml())
    assert RunConfig.from_toml(tmp_path / "run.toml") == run


def test_overrides_parse_values():
    run = RunConfig().with_overrides(
        [
            "train.steps=12",
            "optim.lr=1e-4",
            "model.pattern=M-[*E]",
            "model.moe_num_experts=4",
            "train.compile=true",
            "data.source=builtin:pydoc",
            'data.tokenizer="byte"',
        ]
    )
    assert run.train.steps == 12 and run.optim.lr == 1e-4 and run.train.compile is True
    assert run.model["pattern"] == "M-[*E]" and run.model["moe_num_experts"] == 4
    assert run.model_config(257).parsed.blocks == ("M", "-", "*E")


def test_preset_in_model_table(tmp_path):
    (tmp_path / "run.toml").write_text('[model]\npreset = "tiny"\nhidden_size = 128\n[train]\nsteps = 5\n')
    run = RunConfig.from_toml(tmp_path / "run.toml")
    cfg = run.model_config()
    assert cfg.hidden_size == 128 and cfg.pattern == "M-[*-]G-[ME]M*E/[*-]" and run.train.steps == 5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["train.steps=0"], "train.steps"),
        (["train.steps=ten"], "train.steps"),
        (["train.stepz=10"], "train.stepz"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.schedule=linear"], "optim.schedule"),
        (["optim.beta2=1.5"], "optim.beta2"),
        (["optim.eps=0"], "optim.eps"),  # AdamW's 0 / 0 for a parameter with no gradient yet
        (["data.seq_len=0"], "data.seq_len"),
        (["data.val_fraction=1.0"], "data.val_fraction"),
        (["train.micro_batch_size=5"], "train.micro_batch_size"),
        (["train.device=tpu"], "train.device"),
        (["train.precision=fp8"], "train.precision"),
        (["train.compile_mode=fast"], "train.compile_mode"),
        (["train.compile_mode=max-autotune"], "train.compile_mode"),
        (["train.float8=fp8"], "train.float8"),
        (["train.float8=true"], "train.float8"),
        (["train.gc_every=-1"], "train.gc_every"),
        (["model.hidden_size=0"], "model.hidden_size"),
        (["model.pattern=M*X"], "model.pattern"),
        (["model.hiden_size=3"], "model.hiden_size"),
        (["modle.hidden_size=3"], "modle"),
        (["steps=3"], "steps"),
        (["model.pattern=M-|M-", "parallel.pp=2", "parallel.microbatches=1"], "parallel.microbatches"),
        (["model.pattern=", "train.steps=3"], "model.pattern"),
        # An empty path or name would mean the current folder; seeds and threads in range.
        (["train.run_dir="], "train.run_dir"),
        (["data.source= "], "data.source"),
        (["data.tokenizer="], "data.tokenizer"),
        (["data.seed=-1"], "data.seed"),
        (["train.seed=18446744073709551616"], "train.seed"),
        (["train.threads=100000"], "train.threads"),
        (["train.threads=4097"], "train.threads"),  # MAX_THREADS + 1
        (["optim.decay_fraction=0"], "optim.decay_fraction"),  # a WSD decay of no steps
        (["optim.moe_expert_bias_rate=-0.001"], "optim.moe_expert_bias_rate"),
        (["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps"),
        (['train.device="cuda:\u0661"'], "train.device"),  # a digit to str.isdigit, not to torch
        # Numbers beyond a float, or beyond Python's 4,300-digit integer parsing.
        (["optim.lr=" + "9" * 400], "optim.lr"),
        (["optim.lr=" + "9" * 5000], "optim.lr"),
        (["model.rope_theta=" + "1" + "0" * 400], "model.rope_theta"),
    ],
)
def test_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        RunConfig().with_overrides(overrides)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(field)


def test_override_keys_may_have_spaces_and_none_unsets_any_optional_field(tmp_path):
    """TOML has no null: "none" (or "null") unsets a field that may be None in every section, as in [model]; it was
    refused with "leave the field out", which a resume cannot do (its config.toml holds the value)."""
    assert RunConfig().with_overrides([" train . steps = 7"]).train.steps == 7
    sets = ["train.micro_batch_size=2", "train.threads=1", "parallel.schedule=gpipe", "parallel.microbatches=4"]
    run = RunConfig().with_overrides(sets)
    unset = run.with_overrides(["train.micro_batch_size=none", "train.threads=None", "parallel.schedule=none"])
    unset = unset.with_overrides(["parallel.microbatches=null"])
    assert unset == RunConfig()
    (tmp_path / "run.toml").write_text('[train]\nthreads = "none"\n[parallel]\nschedule = "none"\n')
    assert RunConfig.from_toml(tmp_path / "run.toml") == RunConfig()
    (tmp_path / "config.toml").write_text(unset.to_toml())
    assert RunConfig.from_toml(tmp_path / "config.toml") == unset
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'none'"):
        RunConfig().with_overrides(["train.steps=none"])  # a field that cannot be None still refuses it
    with pytest.raises(ConfigError, match="to unset the field, write 'none'"):
        RunConfig().with_overrides(["train.threads=nil"])


def test_an_empty_optional_text_field_says_to_write_none():
    """--set parallel.schedule= (or "") said "leave it out for its default", which a resume cannot do: its
    config.toml holds the value. A field that may be None says to write 'none'; one that may not, as before."""
    run = RunConfig().with_overrides(["parallel.schedule=gpipe"])
    for empty in ("parallel.schedule=", 'parallel.schedule=" "'):
        with pytest.raises(ConfigError, match=r"^parallel\.schedule: must not be empty \(write 'none' to unset it\)$"):
            run.with_overrides([empty]).validate()
    assert run.with_overrides(["parallel.schedule=none"]).parallel.schedule is None
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: must not be empty \(leave it out for its default\)$"):
        RunConfig().with_overrides(["data.tokenizer="]).validate()


def test_a_resume_can_unset_the_micro_batch_size(tmp_path):
    """--set train.micro_batch_size=none at a resume brings back the default (the whole batch per forward)."""
    from hybridlm.cli import main
    from hybridlm.train.trainer import Trainer
    from tests.train.test_trainer import TINY_RUN

    sets = [a for s in [*TINY_RUN, "train.steps=1", "train.micro_batch_size=2"] for a in ("--set", s)]
    assert main(["train", "--run-dir", str(tmp_path), "--no-progress", *sets]) == 0
    assert "micro_batch_size = 2" in (tmp_path / "config.toml").read_text()
    resume = ["--set", "train.steps=2", "--set", "train.micro_batch_size=none"]
    assert main(["train", "--resume", str(tmp_path), "--no-progress", *resume]) == 0
    assert "micro_batch_size" not in (tmp_path / "config.toml").read_text()
    run = RunConfig.from_toml(tmp_path / "config.toml")
    assert run.train.micro_batch_size is None and run.train.steps == 2
    assert Trainer(run, run_dir=tmp_path, resume=True, progress=False).micro == run.train.batch_size


def test_a_model_field_set_to_none_is_written_and_read_as_none(tmp_path):
    """TOML has no null and q_lora_rank's default is 512: "none" asks for MLA's full-rank query, from --set or a
    run file, and config.toml keeps it, so a resume builds the same model (it read 512 and refused the checkpoint)."""
    run = RunConfig().with_overrides(["model.pattern=+-", "model.q_lora_rank=none"])
    assert run.model_config().q_lora_rank is None
    assert RunConfig().with_overrides(["model.num_query_groups=null"]).model_config().num_query_groups is None
    built = RunConfig.from_dict({"model": {**DEFAULT_MODEL, "pattern": "+-", "q_lora_rank": None}})  # the Python API
    for before in (run, built):
        (tmp_path / "config.toml").write_text(before.to_toml())
        assert RunConfig.from_toml(tmp_path / "config.toml").model_config() == before.model_config()


def test_threads_beyond_the_cores_are_noted():
    import os

    run = RunConfig().with_overrides([f"train.threads={(os.cpu_count() or 1) + 1}"])
    assert any("train.threads" in n and "CPU cores" in n for n in run.notes())
    assert not any("train.threads" in n for n in RunConfig().with_overrides(["train.threads=1"]).notes())


def test_a_wsd_decay_that_starts_inside_the_warmup_is_noted():
    """The learning rate dropped at the warmup's end and decayed over fewer steps than decay_fraction says."""
    from hybridlm.train.optim import lr_factor

    sets = ["optim.schedule=wsd", "train.steps=100", "optim.warmup_steps=30", "optim.decay_fraction=0.8"]
    run = RunConfig().with_overrides(sets)
    note = [n for n in run.notes() if n.startswith("optim.decay_fraction")]
    assert len(note) == 1 and "starts the decay at step 20, inside the warmup of 30 steps" in note[0]
    assert lr_factor(29, 100, run.optim) == 1.0 > lr_factor(30, 100, run.optim)  # the drop the note describes
    for fine in ("optim.decay_fraction=0.7", "optim.schedule=cosine"):
        assert not any(n.startswith("optim.decay_fraction") for n in run.with_overrides([fine]).notes())


def test_settings_the_schedule_or_model_does_not_use_are_noted():
    def notes(*sets):
        return RunConfig().with_overrides(list(sets)).notes()

    assert "optim.schedule = 'cosine' does not use optim.decay_fraction (only 'wsd' does)" in notes(
        "optim.schedule=cosine", "optim.decay_fraction=0.5"
    )
    assert "optim.schedule = 'constant' does not use optim.min_lr_ratio" in notes(
        "optim.schedule=constant", "optim.min_lr_ratio=0.5"
    )
    expert = "optim.moe_expert_bias_rate has no effect without model.moe_router_expert_bias = true"
    assert expert in notes("optim.moe_expert_bias_rate=0.01")
    assert expert not in notes("optim.moe_expert_bias_rate=0.01", "model.moe_router_expert_bias=true")
    assert notes("optim.schedule=wsd", "optim.decay_fraction=0.5", "optim.min_lr_ratio=0.5") == []
    uncompiled = "train.float8 without train.compile = true: each float8 matmul's scaling and casts run as separate"
    assert any(n.startswith(uncompiled) for n in notes("train.float8=tensorwise"))
    assert notes("train.float8=rowwise", "train.compile=true") == []
    assert notes("train.float8_auto_filter=true") == ["train.float8_auto_filter has no effect without train.float8"]


def test_apply_wd_to_qk_layernorm_on_a_model_without_qk_norms_or_without_weight_decay_is_noted():
    """Megatron-LM accepts it silently where nothing matches its q_layernorm / k_layernorm names."""

    def notes(*sets):
        return RunConfig().with_overrides(["optim.apply_wd_to_qk_layernorm=true", *sets]).notes()

    nothing = "optim.apply_wd_to_qk_layernorm has no effect: the model has no q/k norm Megatron-LM decays under it"
    mla = [f"model.{k}={v}" for k, v in MLA_TINY.items()]
    for sets in (["model.pattern=M-[*-]"], ["model.pattern=M-+-/+-", *mla]):
        assert any(n.startswith(nothing) for n in notes(*sets)), sets
    for sets in (["model.pattern=M-[*-]", "model.qk_norm=true"], ["model.pattern=M-/D-", *mla]):  # an MTP depth's
        assert notes(*sets) == [], sets
    zero = "optim.apply_wd_to_qk_layernorm has no effect with optim.weight_decay = 0"
    assert notes("model.pattern=M-[*-]", "model.qk_norm=true", "optim.weight_decay=0") == [zero]


def test_model_fields_the_pattern_does_not_read_are_noted_but_not_a_presets_or_the_defaults_own():
    """A run that sets a field for a layer kind its pattern lacks trained as if it were unset, silently. The
    fields a preset or the embedded default sets are theirs: changing only the pattern notes none of them."""
    run = RunConfig().with_overrides(["model.pattern=M-M-", "model.moe_top_k=3", "model.moe_num_experts=8"])
    assert run.notes() == [
        "model.moe_top_k and model.moe_num_experts have no effect: the pattern has no MoE ('E') layers"
    ]
    assert RunConfig().notes() == []  # the embedded default reads every field it sets
    assert run.with_overrides(["model.num_attention_heads=8"]).notes()[0] == (
        "model.num_attention_heads has no effect: the pattern has no attention ('*'), multi-latent attention "
        "('+') or DeepSeek sparse attention ('D') layers"
    )  # set to another value than the default's: the user's
    tiny = RunConfig().with_overrides(["model.preset=tiny", "model.pattern=M-M-"])  # the preset sets MoE fields
    assert tiny.notes() == []
    assert tiny.with_overrides(["model.mtp_loss_scale=0.3"]).notes() == [
        "model.mtp_loss_scale has no effect: the pattern has no MTP depths"
    ]


def test_an_override_key_is_read_as_its_parts_and_a_text_field_keeps_its_text(tmp_path):
    """``model . preset=tiny`` was not seen as the preset (the default model's fields then overrode it), and
    ``train.run_dir=20240601`` was refused as "expected str, got 20240601"."""
    assert RunConfig().with_overrides(["model . preset=tiny"]).model == {"preset": "tiny"}
    run = RunConfig().with_overrides(["train.run_dir=2024-06-01", "data.source=1.5", "data.jsonl_field=true"])
    assert (run.train.run_dir, run.data.source, run.data.jsonl_field) == ("2024-06-01", "1.5", "true")
    assert RunConfig().with_overrides(['train.run_dir="a b"']).train.run_dir == "a b"
    with pytest.raises(ConfigError, match=r"train\.steps: expected int"):  # other types are still checked
        RunConfig().with_overrides(["train.steps=abc"])
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf[train]\nsteps = 5\n")  # a Windows editor's byte-order mark
    assert RunConfig.from_toml(tmp_path / "bom.toml").train.steps == 5


def test_bad_toml(tmp_path):
    (tmp_path / "bad.toml").write_text("[train\nsteps=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        RunConfig.from_toml(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        RunConfig.from_toml(tmp_path / "missing.toml")
    (tmp_path / "long.toml").write_text("[train]\nsteps = " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"long\.toml: Exceeds the limit"):
        RunConfig.from_toml(tmp_path / "long.toml")


def test_to_toml_round_trips_any_string(tmp_path):
    from hybridlm.train.config import tomllib  # the standard library's, or tomli before Python 3.11

    odd = 'line one\nline "two"\twith a back\\slash, \\n literally, and ünïcødé ✓'
    run = RunConfig()
    run.data.jsonl_field = odd
    run.train.run_dir = str(tmp_path / 'runs "quoted"\\x')
    text = run.to_toml()
    assert tomllib.loads(text)["data"]["jsonl_field"] == odd
    assert list(tomllib.loads(text)) == ["model", "data", "optim", "train", "parallel"]
    (tmp_path / "run.toml").write_text(text, encoding="utf-8")
    assert RunConfig.from_toml(tmp_path / "run.toml") == run


def test_gpipe_takes_fewer_micro_batches_than_stages():
    RunConfig().with_overrides(
        ["model.pattern=M-|M-", "parallel.pp=2", "parallel.microbatches=1", "parallel.schedule=gpipe"]
    )


def test_the_last_model_preset_override_wins():
    """Of two --set model.preset, the first was applied: a later --set did not override an earlier one."""
    run = RunConfig().with_overrides(["model.preset=tiny", "model.hidden_size=64", "model.preset=bench-1.3b"])
    assert run.model["preset"] == "bench-1.3b" and run.model["hidden_size"] == 64
    assert run.model_config().pattern == RunConfig().with_overrides(["model.preset=bench-1.3b"]).model_config().pattern
    assert RunConfig().with_overrides(["model.preset=bench-1.3b", "model.preset=tiny"]).model["preset"] == "tiny"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["optim.beta1=1.0"], "optim.beta1"),  # AdamW's bias correction divides by 1 - beta**t = 0
        (["optim.beta2=1.0"], "optim.beta2"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints"),  # checkpoints[:-0] pruned none
        (["train.steps=true"], "train.steps"),  # a bool is an int to Python: it trained 1 step
        (["train.batch_size=false"], "train.batch_size"),
    ],
)
def test_edge_values_are_refused_with_the_field(overrides, field):
    """Values at the edge of a range, or bools in an int field, were accepted (a torch error or a wrong run later)."""
    with pytest.raises(ConfigError) as info:
        RunConfig().with_overrides(overrides)
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize("field", ["train.steps", "data.seq_len", "train.batch_size", "optim.warmup_steps"])
def test_an_integer_beyond_64_bits_is_refused_by_name(field):
    """train.steps=10**400 passed validation, then the run's notes overflowed a float (the WSD decay's start): an
    "unexpected OverflowError" after config.toml was written; data.seq_len or train.batch_size so, the memory check."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: must be at most 2\*\*63 - 1, got 1{'0' * 400}$"):
        RunConfig().with_overrides([f"{field}={10**400}"])
    RunConfig().with_overrides([f"{field}={2**63 - 1}", "optim.schedule=wsd"]).notes()  # the largest: no overflow


@pytest.mark.parametrize("where", ["toml", "override"])
def test_an_unknown_section_is_called_a_section(tmp_path, where):
    """A misspelt table ([trian]) or --set trian.steps=3 said "trian: unknown field", though it names a section."""
    with pytest.raises(ConfigError) as info:
        if where == "toml":
            (tmp_path / "run.toml").write_text("[trian]\nsteps = 3\n")
            RunConfig.from_toml(tmp_path / "run.toml")
        else:
            RunConfig().with_overrides(["trian.steps=3"])
    assert info.value.field == "trian"
    assert str(info.value) == (
        "trian: unknown section (did you mean 'train'?); the sections are model, data, optim, train, parallel"
    )


@pytest.mark.parametrize("item", [".=3", "train.=3", ".steps=3", " . =3"])
def test_an_override_without_a_section_or_field_name_says_what_it_needs(item):
    """An override of ".=3" said ": unknown field", and one of "train.=3" "train.: unknown field (did you mean
    'train.seed'?)"."""
    with pytest.raises(ConfigError, match=r"an override names a section and a field, e\.g\. train\.steps=100"):
        RunConfig().with_overrides([item])


def test_an_ac_policy_kind_that_starts_no_block_is_noted():
    """``E=full`` over ``M-[*E]``: the fused block's policy is its attention's, so the entry changed nothing, silently."""
    base = ["model.moe_num_experts=2", "train.activation_checkpointing=true"]
    run = RunConfig().with_overrides(
        [*base, "model.pattern=M-[*E]M-/[*-]", "train.ac_policy=E=full,M=selective,-=none"]
    )
    assert [n for n in run.notes() if "ac_policy" in n] == [
        "train.ac_policy names 'E', which starts no block of the pattern: a block's policy is that of its first layer "
        "(a fused block's, its sequence mixer's)"
    ]
    run = RunConfig().with_overrides([*base, "model.pattern=M-E[*-]", "train.ac_policy=E=full,*=selective"])
    assert not [n for n in run.notes() if "ac_policy" in n]  # E and * (the fused block's attention) start blocks


@pytest.mark.parametrize(
    "key, says",
    [
        ("parallel.vpp", "virtual stages are the pattern's '|' segments"),
        ("parallel.dp", "number of processes"),
        ("parallel.tp", "tensor parallelism is not offered"),
        ("parallel.cp", "context parallelism is not offered"),
        ("parallel.ep", "expert parallelism is not offered"),
    ],
)
def test_settings_other_trainers_have_say_where_hybridlm_takes_them_from(tmp_path, key, says):
    """`parallel.vpp` (and `tp`, `cp`, `ep`) were answered "did you mean 'parallel.pp'?", which sets something else."""
    with pytest.raises(ConfigError, match=f"^{key}: unknown field: .*{says}") as info:
        RunConfig().with_overrides([f"{key}=2"])
    assert "did you mean" not in str(info.value)
    section, field = key.split(".")
    (tmp_path / "run.toml").write_text(f"[{section}]\n{field} = 2\n")
    with pytest.raises(ConfigError, match=f"^{key}: unknown field: .*{says}"):
        RunConfig.from_toml(tmp_path / "run.toml")


@pytest.mark.parametrize(
    ("assignment", "hint"),
    [
        ("optim.lr=.001", "TOML reads a number written as 0.001"),
        ("optim.lr=5.", "TOML reads a number written as 5.0"),
        ("train.compile=True", "TOML writes it in lower case: true"),
        ("train.steps=1.", "TOML reads an integer written as 1"),
    ],
)
def test_a_value_toml_reads_as_a_string_says_how_toml_spells_it(assignment, hint):
    """``--set optim.lr=.001`` and ``train.compile=True`` are not TOML values, so they arrived as strings and
    the error said only "expected float, got '.001'"; it now says how to write them."""
    with pytest.raises(ConfigError, match=re.escape(hint)):
        RunConfig().with_overrides([assignment])
    with pytest.raises(ConfigError, match=r"expected float, got 'abc'$"):  # no hint where none fits
        RunConfig().with_overrides(["optim.lr=abc"])


@pytest.mark.parametrize(
    ("assignment", "hint"),
    [
        ("model.init_std=.02", "got '.02' (str) (TOML reads a number written as 0.02)"),
        ("model.tie_embeddings=True", "(TOML writes it in lower case: true)"),
        ("model.num_attention_heads=4.", "expected int or null, got '4.' (str) (TOML reads an integer written as 4)"),
    ],
)
def test_a_model_value_toml_reads_as_a_string_says_how_toml_spells_it_too(assignment, hint):
    """The hint reached the data, optim, train and parallel sections only: --set model.init_std=.02, the section
    most --set lines change, said just "expected float, got '.02' (str)"."""
    with pytest.raises(ConfigError, match=re.escape(hint) + "$"):
        RunConfig().with_overrides([assignment]).validate()
    with pytest.raises(ConfigError, match=r"^model\.init_std: expected float, got 'abc' \(str\)$"):  # none fits
        RunConfig().with_overrides(["model.init_std=abc"]).validate()


def test_more_pipeline_stages_than_blocks_are_refused_as_such():
    """pp 4 over one block said "cannot split the 1 blocks ... evenly; cut the stages with '|'", which no '|'
    can do; pp 2 over three blocks (M, -, M) still asks for a '|'."""
    with pytest.raises(
        ConfigError, match=r"^parallel\.pp: 4 pipeline stages are more than the pattern's 1 block allow: .*at most 3 "
    ):
        RunConfig().with_overrides(["model.pattern=M", "parallel.pp=4"]).validate()
    with pytest.raises(ConfigError, match=re.escape("cannot split the 3 blocks of a pattern without '|' evenly")):
        RunConfig().with_overrides(["model.pattern=M-M", "parallel.pp=2"]).validate()


@pytest.mark.parametrize(("pattern", "pp"), [("M|", 2), ("|M", 2), ("|M|", 3), ("|M|M|", 4), ("[M-]|/*-", 2)])
def test_end_ranks_holding_only_the_embedding_or_head_may_outnumber_the_blocks(pattern, pp):
    """The first and last ranks may hold only the embedding and the head (empty end segments train as one process
    does: test_empty_end_segments_and_empty_virtual_stage_follow_one_process); "M|" over pp 2 was refused as
    "2 pipeline stages need a block each; the pattern has 1 block", though the '|' it asked for made it work."""
    sets = [f"model.pattern={pattern}", f"parallel.pp={pp}", "model.num_attention_heads=2", "model.hidden_size=32"]
    RunConfig().with_overrides(sets).validate()


@pytest.mark.parametrize(
    "assignment",
    [
        "train.steps=.5",  # not an integer: no "integer written as 0"
        "train.steps=1.e30",  # an integer too large for the field: no hint to write one it refuses
        "optim.lr=NaN",  # not finite: refused however written, so no "number written as nan"
        "optim.lr=Infinity",
    ],
)
def test_a_string_no_toml_value_of_the_field_fits_gets_no_spelling_hint(assignment):
    """The spelling hint names only a value the field then accepts (a hint toward one it refuses misleads)."""
    field, raw = assignment.split("=")
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: expected (int|float), got {re.escape(repr(raw))}$"):
        RunConfig().with_overrides([assignment])


def test_integers_at_the_64_bit_edge():
    """2**63 - 1 is the largest integer setting, seeds included; 2**63 is refused by name (the tests above take
    only 10**400 and 2**64)."""
    config = RunConfig().with_overrides([f"data.seed={2**63 - 1}", f"train.seed={2**63 - 1}"])
    config.validate()
    assert config.data.seed == config.train.seed == 2**63 - 1
    for field in ("train.steps", "train.seed", "data.seed"):
        with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: must be .*, got {2**63}$"):
            RunConfig().with_overrides([f"{field}={2**63}"]).validate()


def test_the_closed_ends_of_ranges_are_accepted():
    """min_lr_ratio 1 (no decay), decay_fraction 1 (a WSD decay over the whole run), MAX_THREADS threads."""
    run = RunConfig().with_overrides(["optim.min_lr_ratio=1.0", "optim.decay_fraction=1.0", "train.threads=4096"])
    assert (run.optim.min_lr_ratio, run.optim.decay_fraction, run.train.threads) == (1.0, 1.0, 4096)


def test_a_run_config_built_in_python_is_range_checked_too():
    """Seeds beyond 64 bits are refused by validate() itself, not only by the TOML / override type check."""
    from hybridlm.train.config import DataConfig, TrainConfig

    for run, field in (
        (RunConfig(data=DataConfig(seed=2**64)), "data.seed"),
        (RunConfig(train=TrainConfig(seed=2**63)), "train.seed"),
    ):
        with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: must be in \[0, 2\*\*63 - 1\]"):
            run.validate()


def test_a_run_without_a_vocabulary_has_the_byte_tokenizers():
    """vocab_size left out and no tokenizer to ask: 257, the byte tokenizer's 256 bytes and its end-of-document."""
    assert RunConfig().model_config().vocab_size == 257
    assert RunConfig().model_config(vocab_size=1000).vocab_size == 1000


def test_a_warmup_of_exactly_the_run_reaches_the_rate_at_its_last_step():
    def notes(warmup):
        return [n for n in RunConfig().with_overrides(["train.steps=50", f"optim.warmup_steps={warmup}"]).notes()]

    assert notes(49) == []
    assert notes(50) == [
        "optim.warmup_steps (50) >= train.steps (50): the learning rate reaches optim.lr at the last step only and "
        "never decays"
    ]
    assert "never reaches optim.lr" in notes(51)[0]


def test_settings_that_are_used_or_at_their_default_are_not_noted():
    import os

    def notes(*sets):
        return RunConfig().with_overrides(list(sets)).notes()

    assert notes("optim.schedule=constant") == []  # min_lr_ratio left at its default
    assert notes(f"train.threads={os.cpu_count() or 1}") == []  # as many threads as cores
    # pipeline settings with pp > 1 are used
    assert notes("model.pattern=M-|M-", "parallel.pp=2", "parallel.microbatches=4", "parallel.schedule=gpipe") == []
    # an ac_policy kind that starts only an MTP depth's block starts a block
    run = ["model.pattern=M-/*-", "train.activation_checkpointing=true", "train.ac_policy=*=selective"]
    assert notes(*run) == []


def test_an_interleaved_micro_batch_count_that_makes_unequal_rounds_names_counts_that_do_not():
    """5 micro-batches over pp=2 are 2 rounds of unequal size: 4 and 6 make equal ones (7 would not)."""
    sets = ["model.pattern=M-|M-|M-|M-", "parallel.pp=2", "parallel.microbatches=5"]
    with pytest.raises(ConfigError, match=r"which 5 does not split; e\.g\. 4 or 6, or looped-bfs"):
        RunConfig().with_overrides(sets)
    for fits in (4, 6):
        RunConfig().with_overrides([*sets[:2], f"parallel.microbatches={fits}"])


@pytest.mark.parametrize(
    "key, says",
    [
        ("train.train_iters", "train.steps"),  # was "did you mean 'train.run_dir'?"
        ("train.save_interval", "train.checkpoint_every"),  # was 'train.seed'
        ("train.bf16", 'train.precision = "bf16"'),  # was 'train.seed'
        ("optim.clip_grad", "optim.grad_clip"),  # was 'optim.lr'
        ("optim.lr_decay_style", "optim.schedule"),  # was 'optim.decay_fraction'
        ("optim.no_weight_decay_cond_type", "optim.apply_wd_to_qk_layernorm"),  # was 'optim.weight_decay'
        ("train.apply_wd_to_qk_layernorm", "optim.apply_wd_to_qk_layernorm"),  # was no hint
        ("parallel.pipeline_model_parallel_size", "parallel.pp"),  # was no hint
        ("train.seq_len", "data.seq_len"),  # a field of another section: was 'train.seed'
        ("train.hidden_size", "model.hidden_size"),  # was 'train.batch_size'
    ],
)
def test_megatron_arguments_and_fields_of_another_section_say_where_hybridlm_takes_them(tmp_path, key, says):
    """A Megatron-LM user's argument names, or a field put in the wrong table, were answered with the closest
    name of the section, which set something else."""
    with pytest.raises(ConfigError, match=r"^" + re.escape(f"{key}: unknown field") + ".*" + re.escape(says)) as info:
        RunConfig().with_overrides([f"{key}=2"])
    assert "did you mean" not in str(info.value)
    section, field = key.split(".")
    (tmp_path / "run.toml").write_text(f"[{section}]\n{field} = 2\n")
    with pytest.raises(ConfigError, match=re.escape(says)):
        RunConfig.from_toml(tmp_path / "run.toml")


def test_a_field_outside_its_table_names_the_table(tmp_path):
    """A run file's ``steps = 3`` above its first table was refused as "unknown section; the sections are ...",
    not saying that steps is a field of [train]."""
    (tmp_path / "run.toml").write_text("steps = 3\n[train]\nbatch_size = 2\n")
    with pytest.raises(ConfigError, match=r"^steps: unknown section: steps is train\.steps \(a field: put it in its"):
        RunConfig.from_toml(tmp_path / "run.toml")


def _init_folder(path):
    import hybridlm
    from hybridlm.model import HybridLM

    sets = ["model.pattern=M-[*-]", "model.hidden_size=32", "model.num_attention_heads=2", "model.mamba_head_dim=16"]
    config = RunConfig().with_overrides(sets).model_config(257)
    return hybridlm.save(HybridLM(config, seed=0), path)


def test_init_from_takes_the_folder_s_model_under_the_fields_the_run_sets(tmp_path):
    folder = _init_folder(tmp_path / "init")
    run = RunConfig().with_overrides([f"train.init_from={folder}"])  # the embedded default's table is no one's
    assert run.model_config().hidden_size == 32 and run.model_config().pattern == "M-[*-]"
    run = run.with_overrides(["model.pattern=M-*-", "model.init_std=0.01"])
    assert (run.model_config().pattern, run.model_config().init_std, run.model_config().hidden_size) == (
        "M-*-",
        0.01,
        32,
    )
    # The run file holds the whole model: a resume reads it, not the folder (which may be gone).
    (tmp_path / "run.toml").write_text(run.to_toml())
    want = run.model_config()
    folder.rename(tmp_path / "gone")
    again = RunConfig.from_toml(tmp_path / "run.toml")
    assert again.model_config() == want and again.train.init_from == str(folder)
    assert not [n for n in again.notes() if n.startswith("model.")]  # the folder's fields are not the user's
    assert again.with_overrides(["model.pattern=M-|*-"]).model_config().pattern == "M-|*-"


def test_a_run_file_s_own_model_field_at_the_embedded_default_s_value_applies_over_init_from(tmp_path):
    """A run file's [model] table is the user's: its mamba_chunk_size = 64 (the embedded default's value) was
    dropped as the default's, and the folder's 32 trained. Without a [model] table the default's are no one's."""
    import hybridlm
    from hybridlm.model import HybridLM

    folder = _init_folder(tmp_path / "init")
    hybridlm.save(HybridLM(hybridlm.load(folder).config.replace(mamba_chunk_size=32), seed=0), folder)
    (tmp_path / "own.toml").write_text(f'[model]\nmamba_chunk_size = 64\n[train]\ninit_from = "{folder}"\n')
    assert RunConfig.from_toml(tmp_path / "own.toml").model_config().mamba_chunk_size == 64
    (tmp_path / "none.toml").write_text(f'[train]\ninit_from = "{folder}"\n')
    assert RunConfig.from_toml(tmp_path / "none.toml").model_config().mamba_chunk_size == 32


def test_a_set_at_the_embedded_default_s_value_applies_over_init_from(tmp_path):
    """`--set model.mamba_chunk_size=64` (the embedded default's value) over a folder with 32 was dropped as the
    default's, and the folder's 32 trained without a word; with or without a run file lacking a [model] table."""
    import hybridlm
    from hybridlm.model import HybridLM

    folder = _init_folder(tmp_path / "init")
    hybridlm.save(HybridLM(hybridlm.load(folder).config.replace(mamba_chunk_size=32), seed=0), folder)
    (tmp_path / "none.toml").write_text(f'[train]\ninit_from = "{folder}"\n')
    for base, init in ((RunConfig(), [f"train.init_from={folder}"]), (RunConfig.from_toml(tmp_path / "none.toml"), [])):
        run = base.with_overrides([*init, "model.mamba_chunk_size=64"])
        assert run.model_config().mamba_chunk_size == 64 and run.set_model_fields() == {"mamba_chunk_size": 64}
        assert base.with_overrides(init).model_config().mamba_chunk_size == 32  # nothing set: the folder's
        # Written and read back (the resume's config.toml): the same model, the folder not needed.
        (tmp_path / "config.toml").write_text(run.to_toml())
        assert RunConfig.from_toml(tmp_path / "config.toml").model_config() == run.model_config()


def test_a_run_folder_or_its_training_state_as_init_from_names_the_run_s_model_folder(tmp_path):
    """A run's folder, or a step-N training state (DCP) in it, was refused as "missing config.json; not a hybridlm
    checkpoint", naming neither what it is nor the model folder to give."""
    run = tmp_path / "run"
    _init_folder(run / "model")
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    (run / "checkpoints" / "step-000004" / ".metadata").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^train\.init_from: .*/run is a training run, not a model folder; give "):
        RunConfig().with_overrides([f"train.init_from={run}"])
    said = r"step-000004 is a training-state checkpoint \(DCP\) of the run .*/run, not a model folder; .*/run/model "
    with pytest.raises(ConfigError, match=r"^train\.init_from: .*" + said):
        RunConfig().with_overrides([f"train.init_from={run / 'checkpoints' / 'step-000004'}"])


def test_a_blank_init_from_set_on_the_command_line_is_refused_by_its_name():
    """`--set train.init_from=` emptied the embedded default's [model] table as an init folder's, and the run was
    refused as "model.pattern: required", naming neither the field nor its mistake."""
    for value in ("", '"  "'):
        for extra in ([], ["model.pattern=M-"]):
            with pytest.raises(ConfigError, match=r"^train\.init_from: must not be empty \(write 'none' to unset it\)"):
                RunConfig().with_overrides([f"train.init_from={value}", *extra])


@pytest.mark.parametrize(
    ("make", "sets", "error"),
    [
        (None, [], r"^train\.init_from: .*/init: no such checkpoint; train\.init_from takes a hybridlm model folder"),
        ("empty", [], r"^train\.init_from: .*missing config\.json; not a hybridlm checkpoint"),
        ("nemotron", [], r"^train\.init_from: .*use `hybridlm convert SRC DST --from nemotron-h`"),
        ("qwen3_next", [], r"^train\.init_from: .*use `hybridlm convert SRC DST --from qwen3-next`"),
        ("model", ["model.preset=tiny"], r"^model\.preset: cannot be combined with train\.init_from"),
    ],
)
def test_an_init_from_that_is_no_model_folder_is_refused_by_name(tmp_path, make, sets, error):
    folder = tmp_path / "init"
    if make == "model":
        _init_folder(folder)
    elif make is not None:
        folder.mkdir()
        if make in ("nemotron", "qwen3_next"):  # a Hugging Face folder, not converted
            model_type = "nemotron_h" if make == "nemotron" else make
            (folder / "config.json").write_text(f'{{"model_type": "{model_type}", "hidden_size": 32}}')
    with pytest.raises(ConfigError, match=error):
        RunConfig().with_overrides([f"train.init_from={folder}", *sets])


@pytest.mark.parametrize(
    "section, keyword, says",
    [
        (
            "train",
            "train_iters",
            r"train\.train_iters: unknown field \(a Megatron-LM argument\): hybridlm's is train\.steps",
        ),
        ("optim", "lrate", r"optim\.lrate: unknown field \(did you mean 'optim\.lr'\?\)"),
        ("train", "seq_len", r"train\.seq_len: unknown field: seq_len is data\.seq_len"),
        ("parallel", "tp", r"parallel\.tp: unknown field: tensor parallelism is not offered"),
    ],
)
def test_a_run_dataclass_built_with_an_unknown_keyword_says_what_the_run_file_says(section, keyword, says):
    """``TrainConfig(train_iters=3)`` raised Python's bare "unexpected keyword argument 'train_iters'"; a run
    file or ``--set`` said where hybridlm takes it. Still a TypeError, as Python's was."""
    cls = type(getattr(RunConfig(), section))
    with pytest.raises(ConfigError, match="^" + says) as info:
        cls(**{keyword: 3})
    assert isinstance(info.value, TypeError)
    with pytest.raises(ConfigError, match="^" + says):
        RunConfig().with_overrides([f"{section}.{keyword}=3"])
    with pytest.raises(ConfigError, match=r"^modle: unknown section \(did you mean 'model'\?\)") as info:
        RunConfig(modle={})
    assert isinstance(info.value, TypeError)


def test_a_run_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """``--config`` naming a FIFO (``--config <(sed ... base.toml)``) blocked ``hybridlm train`` and ``plan`` forever
    in the read, as the tokenizer and checkpoint files named so were once."""
    os.mkfifo(tmp_path / "run.toml")
    with (
        fifos_never_read(tmp_path / "run.toml"),  # (a read would hang the suite, not fail the test)
        pytest.raises(ConfigError, match=rf"^config: {re.escape(str(tmp_path / 'run.toml'))}: not a regular file$"),
    ):
        RunConfig.from_toml(tmp_path / "run.toml")


def test_init_from_refuses_the_other_norm_convention_than_the_folder_s(tmp_path):
    """`norm_zero_centered` changes no tensor shape, so a run that set the other value than the init folder's loaded
    its norm weights and read each as another scale: a zero-centred folder's w (0 here) as the scale itself zeroed
    every norm. Refused by name, before the corpus is read; the folder's own value, or none, is taken."""
    import hybridlm
    from hybridlm.model import HybridLM

    plain = _init_folder(tmp_path / "plain")
    centred = hybridlm.save(
        HybridLM(hybridlm.load(plain).config.replace(norm_zero_centered=True), seed=0), tmp_path / "zc"
    )
    for folder, other in ((centred, "false"), (plain, "true")):
        with pytest.raises(ConfigError, match=rf"^model\.norm_zero_centered: {other} over train\.init_from .*leave "):
            RunConfig().with_overrides([f"train.init_from={folder}", f"model.norm_zero_centered={other}"])
        same = "true" if other == "false" else "false"
        for sets in ([f"model.norm_zero_centered={same}"], []):
            run = RunConfig().with_overrides([f"train.init_from={folder}", *sets])
            assert run.model_config().norm_zero_centered == (folder == centred)


def test_a_blend_s_sources_and_weights_are_set_by_override_and_round_trip(tmp_path):
    """data.source as a TOML array is a blend, data.weights its mix: both from --set (the shell's quotes taken off),
    both written to config.toml and read back; a one-source list stays a list; weights may be unset by 'none'."""
    run = RunConfig().with_overrides(['data.source=["web.jsonl", "builtin:pydoc"]', "data.weights=[7, 3]"])
    assert (run.data.source, run.data.weights) == (["web.jsonl", "builtin:pydoc"], [7, 3])
    assert run.data.sources() == ["web.jsonl", "builtin:pydoc"] and RunConfig().data.sources() == ["builtin:pydoc"]
    (tmp_path / "config.toml").write_text(run.to_toml())
    assert RunConfig.from_toml(tmp_path / "config.toml") == run
    (tmp_path / "run.toml").write_text('[data]\nsource = ["a.txt", "b/"]\nweights = [0.7, 0.3]\n')
    assert RunConfig.from_toml(tmp_path / "run.toml").data.weights == [0.7, 0.3]
    one = RunConfig().with_overrides(['data.source=["a.txt"]'])
    assert one.data.source == ["a.txt"] and RunConfig.from_dict(one.to_dict()) == one
    back = run.with_overrides(["data.source=builtin:pydoc", "data.weights=none"])
    assert (back.data.source, back.data.weights) == ("builtin:pydoc", None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.weights=[1]"], "data.weights: weighs the sources of a blend, but data.source names one"),
        (["data.source=[]"], "data.source: an empty list"),
        (["data.source=[a.jsonl,b]"], "data.source: '[a.jsonl,b]' is no TOML array (its strings need quotes)"),
        (['data.source=["a.txt", " "]'], "data.source: source 2 of the list is empty"),
        (['data.source=["a.txt", 3]'], "data.source: item 2 of the list: expected str, got 3"),
        (['data.source=["a.txt", "./a.txt"]'], "data.source: './a.txt' (source 2) is source 1 again"),
        (['data.source=["a", "b"]', "data.weights=[1]"], "data.weights: 1 weight(s) for the 2 sources"),
        (['data.source=["a", "b"]', "data.weights=[1, 2, 3]"], "data.weights: 3 weight(s) for the 2 sources"),
        (
            ['data.source=["a", "b"]', "data.weights=[1, 0]"],
            "data.weights: weight 2 ('b') must be a positive finite number, got 0",
        ),
        (
            ['data.source=["a", "b"]', "data.weights=[-1, 1]"],
            "data.weights: weight 1 ('a') must be a positive finite number",
        ),
        (['data.source=["a", "b"]', "data.weights=[1, nan]"], "data.weights: item 2 of the list: must be a finite"),
        (['data.source=["a", "b"]', "data.weights=[inf, 1]"], "data.weights: item 1 of the list: must be a finite"),
        (['data.source=["a", "b"]', "data.weights=[1, true]"], "data.weights: item 2 of the list: expected float"),
        (['data.source=["a", "b"]', "data.weights=0.5"], "data.weights: expected a list of float, got 0.5"),
    ],
)
def test_a_blend_s_errors_name_its_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        RunConfig().with_overrides(overrides)
    assert str(info.value).startswith(message), str(info.value)
