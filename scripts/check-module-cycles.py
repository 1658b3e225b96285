#!/usr/bin/env python3
"""Fail when the top-level modules of src/ import each other in a cycle.

A top-level module is a file `src/x.rs` or a directory `src/x/`; an edge
a -> b is any `crate::b` path in a's code (comments skipped). Cycles are
the strongly connected components with more than one module; each is
printed with the lines that make its edges, so the fix is easy to find.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_files(path):
    if path.endswith(".rs"):
        return [path]
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".rs")]


def edges():
    mods = {}
    for entry in sorted(os.listdir(ROOT)):
        name = entry[:-3] if entry.endswith(".rs") else entry
        if name in ("lib", "main"):
            continue
        deps = {}
        for path in module_files(os.path.join(ROOT, entry)):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    code = line.split("//", 1)[0]
                    for dep in re.findall(r"crate::(\w+)", code):
                        if dep != name:
                            deps.setdefault(dep, []).append(f"{os.path.relpath(path, os.path.join(ROOT, '..'))}:{n}")
        mods[name] = deps
    return {m: {d: at for d, at in deps.items() if d in mods} for m, deps in mods.items()}


def cycles(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main():
    graph = edges()
    found = cycles(graph)
    for comp in found:
        print(f"import cycle among src/ modules: {', '.join(comp)}")
        for a in comp:
            for b in comp:
                if b in graph[a]:
                    print(f"  {a} -> {b}: {', '.join(graph[a][b][:3])}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
