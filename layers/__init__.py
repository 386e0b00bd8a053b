"""Building blocks below the mixers: norms and activations (kernel-backed where a fused kernel exists)."""
