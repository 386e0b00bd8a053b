"""``python -m metazoo.validate DATA_DIR --checkpoint CKPT``: top-1/top-5 with the model's own preprocessing."""
from metazoo.train.evaluate import main

if __name__ == "__main__":
    main()
