"""Token and channel mixers shared by every backbone family (one mixer per module)."""
