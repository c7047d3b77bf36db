"""Drive a real openemploi server from the outside, and judge what it did: the helpers tests, benchmarks and operators share.

launcher: a server in a child process. faults (with workload and verify), client_faults,
model_faults, disk_faults: fault injection and the checks that nothing acknowledged was lost.
fuzz_driver and fuzz: raw calls to every RPC and the hypothesis strategies that generate them (the
only module here that imports hypothesis, a dev dependency). bench_results, bench_figures and
bench_compare: the benchmark suite's result, its figures and the comparison of two runs.
ray_cluster: a real Ray cluster of several nodes on this host (`ray start`), to kill and restart nodes.

Nothing of the serving path imports this package.
"""
