"""The mlgate job: config → train → benchmark → optimize → gate → promote → report."""

from automation.threads import wait_passively

# Before torch loads OpenMP (libgomp): idle OpenMP threads sleep instead of spinning (the thread policy,
# automation/threads.py). On a shared runner spinning threads burned the cores the other threads needed
# (benchmarks/omp_wait.py: one epoch of the CPU Fashion-MNIST model beside busy processes, 18.5 s with libgomp's
# default spin, 4.8 s with a short spin, 3.5 s passive; idle about equal). A runner's own setting stands.
wait_passively()
