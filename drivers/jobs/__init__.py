"""AI job adapters: the job-control protocol, its reading type, Slurm and local processes."""
