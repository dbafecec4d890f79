"""lgur: text-to-image person re-identification built around LGUR (Shao et al., ACM MM 2022)."""
import os

# Passive OpenMP waiting. With the default spin-waiting, a CPU shared with DataLoader workers (or any other
# busy process) slowed a training step more than tenfold on a small CPU (README, "Measured"); passive
# waiting costs nothing measurable when the CPU is idle. Only effective if set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
