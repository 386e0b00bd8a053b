"""``python -m metazoo.train.detect``: mmdet 3 detection / instance segmentation from a Hydra config.

No arguments: a small Mask R-CNN on the embedded shapes COCO set (CPU, minutes). Paper presets:
``--config-name detect_mask_rcnn_1x_coco`` or ``detect_retinanet_1x_coco`` with
``detect/backbone=<family>`` and ``data.root=/path/to/coco``. Needs ``scripts/install_openmmlab.sh``.
"""
from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../configs", config_name="detect", version_base=None)
def main(cfg: DictConfig) -> dict:
    """Train with mmengine's Runner, then print and return the final COCO metrics."""
    from metazoo.train.dense_runner import train

    metrics = train(cfg, "detect")
    print(json.dumps({"metrics": metrics}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
