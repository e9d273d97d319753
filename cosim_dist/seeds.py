"""Derived seeds: every random draw of a run is a function of the run seed and counters (EDM2's per-step reseeding),
so a run gives the same result on any number of ranks and resumes exactly from its image count."""

def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from the run seed and integer counters (rank, images seen, step, ...)."""
    return hash((seed, *parts)) & 0x7fff_ffff_ffff_ffff
