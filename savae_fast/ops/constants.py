"""Constants shared by every backend (mirrors csrc/savae_math.h)."""

CLIP_EPS = 1e-6  # |g| + 1e-6 in the clip factor, as torch.nn.utils.clip_grad_norm_

# Decoder evaluation prepared by reverse_direction (FdMode in csrc/savae_math.h).
FD_EXACT = 0
FD_FORWARD = 1
FD_CENTRAL = 2

BACKENDS = ("auto", "cpp", "triton", "torch")
