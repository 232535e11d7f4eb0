"""Every numeric flag of every script is range-checked before anything is built: one `error:` line naming the flag,
the value and the valid range, exit code 2 (the CLI tests check the same from a real command line)."""

import importlib

import pytest

SCRIPTS = ["popgym", "metaworld", "procgen", "atari", "babyai"]
# (field, a bad value): the values a new user tried that crashed, hung or ran into NaN, and the rest of the table
BAD = [
    ("n_heads", 0),
    ("learning_rate", -1.0),
    ("crr_samples", 0),
    ("head_hidden", 0),
    ("warmup_updates", 0),
    ("dropout", 1.5),
    ("checkpoint_every", 0),
    ("tau", 2.0),
    ("gammas", [0.9, 1.0]),
    ("gammas", []),
    ("learning_rate", float("nan")),
    ("total_timesteps", 0),
    ("num_envs", 0),
    ("steps_per_epoch", 0),
    ("buffer_size", 0),
    ("batch_size", 0),
    ("context_len", 0),
    ("d_token", 0),
    ("d_model", 0),
    ("d_ff", 0),
    ("n_layers", 0),
    ("num_critics", 0),
    ("eps_anneal_steps", 0),
    ("eval_episodes", 0),
    ("updates_per_epoch", -1),
    ("eval_every", -1),
    ("num_bins", 1),
    ("popart_beta", 0.0),
    ("weight_decay", -1e-4),
    ("grad_clip", 0.0),
    ("critic_weight", -1.0),
    ("reward_multiplier", 0.0),
    ("crr_threshold", float("inf")),
    ("eps_start", 1.5),
    ("eps_end", -0.1),
    ("log_every", 0.0),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_bad_value_is_refused_in_one_line(script, field, value, capsys):
    module = importlib.import_module(f"amago2_{script}")
    with pytest.raises(SystemExit) as exit_info:
        module.resolve_args(module.Args(**{field: value}))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"error: --{field.replace('_', '-')} ") and "out of range" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("script", SCRIPTS)
def test_paper_defaults_pass(script):
    module = importlib.import_module(f"amago2_{script}")
    assert module.resolve_args(module.Args()).run_name  # the paper's defaults are all in range
    # an --buffer-dir that cannot be created: test_cli.py (the buffer itself refuses it, when the run builds it)
