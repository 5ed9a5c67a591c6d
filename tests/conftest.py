import os

# On small shared CPUs, OpenMP threads that spin-wait for work slow every other process (data
# workers, the other test worker) by an order of magnitude; passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "disabled")
