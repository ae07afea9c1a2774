#!/usr/bin/env python3
"""linux-modclosure.py MODDIR NAME...: prints the module files (paths relative to MODDIR, as in
modules.dep) that NAME... need, in load order: dependencies first. Names that are built in
(modules.builtin) or unknown are reported on stderr and skipped. '-' and '_' are equivalent."""
import os
import sys


def norm(n):
    return n.replace("-", "_")


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    moddir, names = sys.argv[1], sys.argv[2:]
    dep = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            k, _, v = line.partition(":")
            dep[k.strip()] = v.split()
    builtin = set()
    try:
        with open(os.path.join(moddir, "modules.builtin")) as f:
            builtin = {norm(os.path.basename(l.strip())[:-3]) for l in f if l.strip()}
    except OSError:
        pass
    byname = {norm(os.path.basename(k).split(".ko")[0]): k for k in dep}
    order, seen = [], set()

    def visit(path):
        if path in seen:
            return
        seen.add(path)
        # modules.dep lists the deepest dependency last: load from the end
        for d in reversed(dep.get(path, [])):
            visit(d)
        order.append(path)

    for n in names:
        p = byname.get(norm(n))
        if p:
            visit(p)
        elif norm(n) in builtin:
            print(f"    module {n}: built into the kernel", file=sys.stderr)
        else:
            print(f"    module {n}: not in this kernel, skipped", file=sys.stderr)
    print("\n".join(order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
