"""Copy the shared core from amago2_popgym.py into the other scripts (a developer tool, not a test).

Every top-level function or class that a script shares with amago2_popgym.py, and that is not in
test_shared_core.EXEMPT, is replaced by amago2_popgym.py's text; a shared-core definition that a script lacks (one
new in amago2_popgym.py, not in NOT_CORE) is inserted after the definition it follows in amago2_popgym.py.
Usage: python tests/tools/sync_shared_core.py
"""

import ast
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from test_shared_core import EXEMPT, NOT_CORE, ROOT  # noqa: E402


def segments(source):
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    out = {}
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            start = n.decorator_list[0].lineno if n.decorator_list else n.lineno
            out[n.name] = (offsets[start - 1], offsets[n.end_lineno])
    return out


if __name__ == "__main__":
    canon = open(os.path.join(ROOT, "amago2_popgym.py")).read()
    canon_defs = {k: canon[a:b] for k, (a, b) in segments(canon).items()}
    for path in sorted(glob.glob(os.path.join(ROOT, "amago2_*.py"))):
        if path.endswith("amago2_popgym.py"):
            continue
        source = open(path).read()
        changed = []
        for name, (a, b) in sorted(segments(source).items(), key=lambda kv: -kv[1][0]):
            if name in canon_defs and name not in EXEMPT and source[a:b] != canon_defs[name]:
                source = source[:a] + canon_defs[name] + source[b:]
                changed.append(name)
        order = list(canon_defs)
        for i, name in enumerate(order):
            if name in EXEMPT or name in NOT_CORE or name in segments(source):
                continue
            before = next((n for n in reversed(order[:i]) if n in segments(source)), None)
            if before is None:
                sys.exit(f"{os.path.basename(path)}: no definition to insert {name} after; insert it by hand")
            end = segments(source)[before][1]
            source = source[:end] + "\n\n" + canon_defs[name] + source[end:]
            changed.append(f"{name} (new)")
        open(path, "w").write(source)
        print(f"{os.path.basename(path)}: {', '.join(changed) or 'in sync'}")
