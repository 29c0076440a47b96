"""fastvit_reduce: train parameter-reduced ViTs with FFCV + timm."""
