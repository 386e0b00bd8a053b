"""``python -m metazoo.train``: the Hydra training app (see configs/train.yaml)."""
from .app import main

if __name__ == "__main__":
    main()
