import importlib.util, sys, time
import numpy as np
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); return m
old = load("oldvol", "/tmp/old/coral_core/volume.py"); new = load("newvol", "coral_core/volume.py")
rng = np.random.default_rng(0)
vol = rng.integers(-1000, 2000, (100, 512, 512), dtype=np.int16)
print("| function | round | seconds |"); print("|---|---:|---:|")
for rnd in range(3):
    for name, mod in (("before (cf1a79d)", old), ("after", new)):
        t = time.perf_counter(); mod.normalise_intensity(vol); dt = time.perf_counter() - t
        print(f"| {name} | {rnd + 1} | {dt:.2f} |", flush=True)
import tracemalloc
print("| function | peak allocated GB (tracemalloc) |"); print("|---|---:|")
for name, mod in (("before (cf1a79d)", old), ("after", new)):
    tracemalloc.start(); out = mod.normalise_intensity(vol); peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop(); del out
    print(f"| {name} | {peak / 1e9:.2f} |")
