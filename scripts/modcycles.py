#!/usr/bin/env python3
"""Import circles among a crate's top-level modules: `modcycles.py crates/keel/src`.
Edges: a module (file or directory) whose code (comments and tests aside) names `crate::m` or
`use crate::{m, ...}` depends on m. Exit status 1 when there is a circle."""
import os, re, sys
root = sys.argv[1]
mods = {}
for dp, _, fs in os.walk(root):
    for f in fs:
        if not f.endswith('.rs'): continue
        rel = os.path.relpath(os.path.join(dp, f), root)
        top = rel.split(os.sep)[0].removesuffix('.rs')
        if top in ('lib', 'main'): continue
        mods.setdefault(top, []).append(os.path.join(dp, f))
edges = {m: set() for m in mods}
for m, files in mods.items():
    for p in files:
        src = open(p).read()
        # drop test modules
        src = re.split(r'#\[cfg\(test\)\]\s*mod tests', src)[0]
        # code only: comments (doc links included) are not imports
        src = re.sub(r'//[^\n]*', '', src)
        for n in re.findall(r'crate::(\w+)', src):
            if n in mods and n != m: edges[m].add(n)
        for grp in re.findall(r'use crate::\{([^}]*)\}', src):
            for n in re.findall(r'\b(\w+)\b', grp):
                if n in mods and n != m: edges[m].add(n)
# Tarjan
idx = {}; low = {}; st = []; on = set(); out = []; i = [0]
def sc(v):
    idx[v] = low[v] = i[0]; i[0] += 1; st.append(v); on.add(v)
    for w in edges[v]:
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        c = []
        while True:
            w = st.pop(); on.discard(w); c.append(w)
            if w == v: break
        if len(c) > 1: out.append(sorted(c))
sys.setrecursionlimit(10000)
for v in sorted(edges):
    if v not in idx: sc(v)
if not out:
    print(f"{root}: no import circle among {len(mods)} modules")
for c in out:
    print(f"{root}: circle of {len(c)}: {' '.join(c)}")
    for a in c:
        print(f"  {a} -> {' '.join(sorted(e for e in edges[a] if e in c))}")
sys.exit(1 if out else 0)
