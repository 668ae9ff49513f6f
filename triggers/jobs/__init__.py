"""Jobs: the durable queue, workers and their leases, executors (local worktree, GitHub runner), and
the runner's result credential."""
