"""Every top-level function or class defined in more than one amago2_*.py script has identical source in each,
so a fix to the shared core cannot reach one script and miss the others. Per-benchmark names are exempt."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what legitimately differs per benchmark: flags, the env, the timestep encoder and the action distribution
EXEMPT = {"Args", "make_env", "make_eval_envs", "check_env_args", "summarize_eval", "TimestepEncoder", "make_encoder",
          "Actor", "action_features", "dpg_actor_loss", "explore", "NO_ACTION"}


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
    mismatched = [f"{name}: {', '.join(s for s, _ in where)}" for name, where in seen.items()
                  if name not in EXEMPT and len({src for _, src in where}) > 1]
    assert not mismatched, "shared definitions differ between scripts:\n" + "\n".join(mismatched)


def test_popgym_core_is_in_every_script():
    """The shared core of the canonical script appears in each full script (once the script has its loop)."""
    core = {n: s for n, s in definitions(os.path.join(ROOT, "amago2_popgym.py")).items() if n not in EXEMPT}
    core = {n for n in core if n not in {"popgym_class", "flat_size", "flatten", "num_actions", "POPGymMetaEnv", "InputNorm"}}
    for path in glob.glob(os.path.join(ROOT, "amago2_*.py")):
        if "__main__" not in open(path).read():
            continue  # a script still being assembled
        missing = core - set(definitions(path))
        assert not missing, f"{os.path.basename(path)} lacks shared definitions: {sorted(missing)}"


def test_pixel_scripts_share_their_encoder():
    """Atari and Procgen use the same pixel timestep encoder text (issue: "same text")."""
    atari, procgen = (os.path.join(ROOT, f"amago2_{b}.py") for b in ("atari", "procgen"))
    if not all("__main__" in open(p).read() for p in (atari, procgen)):
        return  # a script still being assembled
    assert definitions(atari)["TimestepEncoder"] == definitions(procgen)["TimestepEncoder"]
