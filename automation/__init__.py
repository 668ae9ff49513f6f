"""The mlgate job: config → train → benchmark → optimize → gate → promote → report."""

import os

# Before torch loads OpenMP (libgomp): a waiting thread spins 10,000 times, not libgomp's 300,000, then sleeps.
# On a shared runner (beside a test suite, or other jobs) the long spin burned the cores the other threads
# needed: one epoch of the CPU Fashion-MNIST model beside two busy processes took 13.9 s, 6.4 s with the
# short spin, and idle 2.5 s either way (benchmarks/omp_wait.py). OMP_WAIT_POLICY or a count the runner
# sets stands.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
