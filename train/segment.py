"""``python -m metazoo.train.segment``: mmseg 1 semantic segmentation from a Hydra config.

No arguments: a small UperNet on the embedded shapes set in ADE20K layout (CPU, minutes). Presets:
``--config-name segment_upernet_160k_ade20k``, ``segment_fpn_40k_ade20k`` or
``segment_deeplabv3_80k_ade20k`` with ``segment/backbone=<family>`` and
``data.root=/path/to/ADEChallengeData2016``. Needs ``scripts/install_openmmlab.sh``.
"""
from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../configs", config_name="segment", version_base=None)
def main(cfg: DictConfig) -> dict:
    """Train with mmengine's Runner, then print and return the final mIoU metrics."""
    from metazoo.train.dense_runner import train

    metrics = train(cfg, "segment")
    print(json.dumps({"metrics": metrics}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
