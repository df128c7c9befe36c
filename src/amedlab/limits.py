"""Upper bounds on sizes a user sets: a value beyond them is a typo or a unit slip (``nfe=1e12``,
``eval.seeds=0-9999999999``), refused before anything is allocated. Each is far above any published
setting (EDM: 50k seeds, 18-step grids; the paper's distillation: 10k trajectories)."""

MAX_NFE = 1000                  # model evaluations of a cell, a reference or a teacher
SEED_LIMIT = 2**32              # seeds are in [0, 2^32): torch-fidelity's KID and numpy's generators take no more
MAX_SEEDS = 1_000_000           # samples of one cell (eval.seeds)
MAX_TRAJECTORIES = 1_000_000    # teacher trajectories of a distillation
MAX_RESAMPLES = 100_000         # bootstrap replicates
MAX_THREADS = 1024              # torch CPU threads
MAX_BATCH = 1_000_000           # any batch size
MAX_EPOCHS = 100_000            # training epochs or steps of a stage
MAX_KID_SUBSETS = 100_000       # KID subsets and their size
MAX_SAMPLE_GRID = 4096          # images in samples.png
MAX_ANY_INT = 10**9             # every other integer setting

#: the bound of an integer key by its last name (every integer key has one: :func:`upper_bound`)
_BY_NAME = {"nfe": MAX_NFE, "seed": SEED_LIMIT - 1, "first_seed": SEED_LIMIT - 1, "num_threads": MAX_THREADS,
            "batch_size": MAX_BATCH, "gen_batch_size": MAX_BATCH, "chunk_size": MAX_SEEDS,
            "num_trajectories": MAX_TRAJECTORIES, "epochs": MAX_EPOCHS, "steps": MAX_EPOCHS,
            "num_samples": MAX_SEEDS, "kid_subsets": MAX_KID_SUBSETS, "kid_subset_size": MAX_SEEDS,
            "sample_grid": MAX_SAMPLE_GRID, "resamples": MAX_RESAMPLES, "image_size": 4096, "M": 100}


def upper_bound(key: str) -> int:
    """The largest value accepted for the integer setting ``key`` (e.g. ``eval.ode_reference.nfe``)."""
    return _BY_NAME.get(key.rsplit(".", 1)[-1], MAX_ANY_INT)
