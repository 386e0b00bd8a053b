"""Embedded procedural datasets (``shapes``: classification, COCO and ADE20K layouts), written on first use."""
