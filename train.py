"""Train the record model, then (as the reference) evaluate it.

    python train.py --config configs/record.py [--resume] [--config.<field>=<value>]

The logic lives in golf_jax.train, where it can be tested and imported.
"""

from golf_jax.train import main

if __name__ == "__main__":
    main()
