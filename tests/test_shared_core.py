"""Every top-level function or class defined in more than one amago2_*.py script has identical source in each,
so a fix to the shared core cannot reach one script and miss the others. Per-benchmark names are exempt."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what legitimately differs per benchmark: flags, the env, the timestep encoder and the action distribution
EXEMPT = {
    "Args",
    "make_env",
    "make_eval_envs",
    "check_env_args",
    "summarize_eval",
    "TimestepEncoder",
    "Actor",
    "action_features",
    "dpg_actor_loss",
    "every_action",
    "policy_stats",
    "replayed_actions",
    "next_state_values",
    "explore",
    "NO_ACTION",
}


def definitions(path):
    source = open(path).read()
    tree = ast.parse(source)
    return {n.name: ast.get_source_segment(source, n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_shared_definitions_are_identical():
    scripts = sorted(glob.glob(os.path.join(ROOT, "amago2_*.py")))
    defs = {os.path.basename(p): definitions(p) for p in scripts}
    seen = {}
    for script, d in defs.items():
        for name, src in d.items():
            seen.setdefault(name, []).append((script, src))
    mismatched = [
        f"{name}: {', '.join(s for s, _ in where)}"
        for name, where in seen.items()
        if name not in EXEMPT and len({src for _, src in where}) > 1
    ]
    assert not mismatched, "shared definitions differ between scripts:\n" + "\n".join(mismatched)


SCRIPTS = ["popgym", "metaworld", "procgen", "atari", "babyai"]
NOT_CORE = {  # POPGym's own env, and definitions only some scripts need (identical where they repeat)
    "num_actions",
    "POPGymMetaEnv",
    "InputNorm",
}


def test_popgym_core_is_in_every_script():
    """The shared core of the canonical script appears in each of the five scripts."""
    core = set(definitions(os.path.join(ROOT, "amago2_popgym.py"))) - EXEMPT - NOT_CORE
    for name in SCRIPTS:
        missing = core - set(definitions(os.path.join(ROOT, f"amago2_{name}.py")))
        assert not missing, f"amago2_{name}.py lacks shared definitions: {sorted(missing)}"


def test_pixel_scripts_share_their_encoder():
    """Atari and Procgen use the same pixel timestep encoder text (issue: "same text")."""
    atari, procgen = (definitions(os.path.join(ROOT, f"amago2_{b}.py")) for b in ("atari", "procgen"))
    assert atari["TimestepEncoder"] == procgen["TimestepEncoder"]
