#!/usr/bin/env python
"""Is the simulation itself exact? Simulated DeiT-Tiny in float32 and in float64 vs the integer model.

    python benchmarks/integer_vs_float64.py <preset> [states dir]   (first 50 val1300 images)

Prints how often the float32 simulation and the integer model pick the float64 simulation's top-1.
"""
import sys, torch, copy
sys.path.insert(0,'.'); sys.path.insert(0,'benchmarks')
from integer_agreement import build_simulated, load_images
from fqvit_det.integer import to_integer
pr = sys.argv[1]
sim, spec, arch = build_simulated(pr, sys.argv[2] if len(sys.argv) > 2 else 'work_dirs/integer_states', '/work/shared/data')
im = to_integer(sim)
s64 = copy.deepcopy(sim).double()
n = a32 = ai = 0
with torch.no_grad():
    for x, y in load_images('/work/shared/data', 50, 25):
        a, b, c = sim(x), im(x), s64(x.double())
        a32 += int((a.argmax(1) == c.argmax(1)).sum()); ai += int((b.argmax(1) == c.argmax(1)).sum()); n += len(y)
print(pr, 'sim float32 vs sim float64 agree', a32, '/', n, '| integer vs sim float64 agree', ai, '/', n)
