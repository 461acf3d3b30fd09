"""Starting and stopping jobs on this machine, behind the launcher seam (`base`: `Launcher`,
`Handle`, `Outcome`).

`local` runs commands as process trees in their own sessions; `pool` runs Python calls in
reused worker processes, forked by the `zygote`; `worker_main` is the worker's own script
(standard library only) and the protocol both ends speak; `proctree` reads and signals process
trees, `cgroups` gives a job a memory cgroup, `watchman` kills the jobs if this process dies.
"""
