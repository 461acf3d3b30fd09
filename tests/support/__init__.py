"""What the tests share: helpers, fixtures, the small programs they run, and the test SLURM node."""
