"""Image VAE of the SA-VAE paper: residual CNN encoder, gated PixelCNN decoder
conditioned on z, Bernoulli pixels.

Images are float tensors ``[B, 1, H, W]`` with values in {0, 1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from savae_fast.models.base import LatentVariableModel
from savae_fast.nn import repeat_rows


def check_images(name: str, x: Tensor, image_size: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 1 or x.shape[2:] != (image_size, image_size):
        raise ValueError(f"{name}: argument 'x' must be a [batch, 1, {image_size}, {image_size}] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: argument 'x' must be a floating-point tensor of 0/1 pixels, got {x.dtype}")


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride) if (stride != 1 or c_in != c_out) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.skip(x) + self.conv2(F.relu(self.conv1(x))))


class ResidualEncoder(nn.Module):
    """q(z | x): residual conv layers (the first two downsample), then a linear map to (mu, logvar).

    Args:
        latent_dim: D.
        image_size: the side of the square binary images.
        channels: convolution channels.
        layers: residual blocks.

    Called on images ``[B, 1, S, S]`` it returns ``(mu, logvar)``, ``[B, D]`` each.

    Raises:
        ValueError: at call time, images of another shape or an integer dtype (named).

    Example:
        >>> enc = ResidualEncoder(latent_dim=2, image_size=8, channels=4, layers=2)
        >>> enc(torch.zeros(3, 1, 8, 8))[0].shape
        torch.Size([3, 2])
    """

    def __init__(self, latent_dim: int, image_size: int = 28, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks, c_in, size = [], 1, image_size
        for i in range(layers):
            stride = 2 if i < 2 else 1
            blocks.append(ResidualBlock(c_in, channels, stride))
            c_in, size = channels, (size + stride - 1) // stride
        self.blocks = nn.Sequential(*blocks)
        self.to_params = nn.Linear(channels * size * size, 2 * latent_dim)
        self.image_size = image_size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_images("ResidualEncoder", x, self.image_size)
        mu, logvar = self.to_params(self.blocks(x).flatten(1)).chunk(2, dim=1)
        return mu, logvar


class GatedLayer(nn.Module):
    """One gated PixelCNN layer (van den Oord et al. 2016) with vertical and horizontal stacks.

    Mask A (first layer): a pixel's horizontal features do not see the pixel itself; mask B
    (later layers) they do, since its features never depend on its own value. The vertical
    stack reaches the horizontal stack shifted down by one row, so both see only pixels
    above or to the left.
    """

    def __init__(self, c_in: int, channels: int, kernel: int, mask_a: bool, cond_channels: int):
        super().__init__()
        k = kernel // 2
        self.k, self.mask_a = k, mask_a
        self.vert = nn.Conv2d(c_in, 2 * channels, (k + 1, kernel), padding=(k, k))
        self.horiz = nn.Conv2d(c_in, 2 * channels, (1, k + 1), padding=(0, k))
        self.vert_to_horiz = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horiz_out = nn.Conv2d(channels, channels, 1)
        self.cond_v = nn.Conv2d(cond_channels, 2 * channels, 1) if cond_channels else None
        self.cond_h = nn.Conv2d(cond_channels, 2 * channels, 1) if cond_channels else None
        self.residual = not mask_a and c_in == channels

    @staticmethod
    def _gate(x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v: Tensor, h: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        height, width = v.shape[-2:]
        v_feat = self.vert(v)[:, :, :height, :]  # row i sees rows i-k .. i
        v_down = F.pad(v_feat, (0, 0, 1, 0))[:, :, :height, :]  # rows < i only
        h_feat = self.horiz(h)[:, :, :, :width]  # column j sees columns j-k .. j
        if self.mask_a:
            h_feat = F.pad(h_feat, (1, 0, 0, 0))[:, :, :, :width]  # columns < j only
        h_feat = h_feat + self.vert_to_horiz(v_down)
        if cond is not None:
            if cond.shape[0] != v_feat.shape[0]:  # n points per example (stacked z): the image's features repeated
                v_feat, h_feat, h = (repeat_rows(t, cond) for t in (v_feat, h_feat, h))
            v_feat = v_feat + self.cond_v(cond)
            h_feat = h_feat + self.cond_h(cond)
        h_out = self.horiz_out(self._gate(h_feat))
        if self.residual:
            h_out = h_out + h
        return self._gate(v_feat), h_out


# The output head's activation. SA-VAE differentiates the decoder's gradient w.r.t. z
# by finite differences; a piecewise-linear ReLU makes that gradient jump wherever a
# unit changes sign, so difference quotients at any practical step disagree with the
# (almost-everywhere) Hessian by far more than rounding. GELU keeps the decoder smooth.
ACTIVATIONS = {"gelu": nn.GELU, "softplus": nn.Softplus, "elu": nn.ELU, "relu": nn.ReLU}


def _activation(owner: str, name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner}: 'activation' must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class GatedPixelCNNDecoder(nn.Module):
    """p(x | z): gated PixelCNN over binary pixels, conditioned on z through a linear map
    to ``cond_channels`` extra feature maps; ``latent_dim=0`` gives the plain PixelCNN.
    ``activation`` is the output head's non-linearity (smooth by default: see ACTIVATIONS).

    Args:
        latent_dim: D (0: the plain PixelCNN).
        image_size: the side of the square binary images.
        channels: the gated layers' channels.
        kernels: one kernel size per gated layer.
        cond_channels: feature maps made from z.
        activation: the head's non-linearity, a name of ``ACTIVATIONS`` (``"gelu"``; a
            piecewise-linear one has no second derivative for the difference modes to see).

    ``nll(x, z)`` takes images ``[B, 1, S, S]`` of 0/1 pixels and ``z`` ``[B, D]`` or
    ``[n * B, D]`` and returns per-image NLLs (nats) ``[B]`` or ``[n * B]``.

    Raises:
        ValueError: an unknown ``activation``; at call time, bad images or latents (named).

    Example:
        >>> dec = GatedPixelCNNDecoder(latent_dim=2, image_size=8, channels=4, kernels=(3, 3))
        >>> dec.nll(torch.zeros(3, 1, 8, 8), torch.zeros(3, 2)).shape
        torch.Size([3])
    """

    def __init__(self, latent_dim: int, image_size: int = 28, channels: int = 32,
                 kernels: tuple = (9, 9, 9, 7, 7, 7, 5, 5, 5, 3, 3, 3), cond_channels: int = 4,
                 activation: str = "gelu"):
        super().__init__()
        act = _activation("GatedPixelCNNDecoder", activation)
        self.latent_dim, self.image_size = latent_dim, image_size
        self.cond_channels = cond_channels if latent_dim > 0 else 0
        self.to_cond = nn.Linear(latent_dim, self.cond_channels * image_size * image_size) if latent_dim else None
        self.layers = nn.ModuleList(
            GatedLayer(1 if i == 0 else channels, channels, k, mask_a=(i == 0), cond_channels=self.cond_channels)
            for i, k in enumerate(kernels)
        )
        self.out = nn.Sequential(act(), nn.Conv2d(channels, channels, 1), act(), nn.Conv2d(channels, 1, 1))

    def logits(self, x: Tensor, z: Tensor | None) -> Tensor:
        from savae_fast.models.text import check_latent

        check_images("GatedPixelCNNDecoder", x, self.image_size)
        check_latent("GatedPixelCNNDecoder", z, x.shape[0], self.latent_dim)  # [B or n * B, D]
        cond = None
        if self.to_cond is not None:
            cond = self.to_cond(z.to(x.dtype)).view(-1, self.cond_channels, self.image_size, self.image_size)
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, cond)
        return self.out(h)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """Same as :meth:`nll` (so the decoder works with torch.func.functional_call)."""
        return self.nll(x, z)

    def nll(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """Per-image negative log-likelihood (nats), ``[B]`` (``[n * B]`` for z of n points per
        example, point-major: the layers' features of x are computed once and repeated)."""
        logits = self.logits(x, z)
        target = x if logits.shape[0] == x.shape[0] else repeat_rows(x, logits)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)


class ImageVAE(LatentVariableModel):
    """The paper's image VAE: a residual encoder and a gated PixelCNN decoder conditioned on z
    (``latent_dim=0``: the plain PixelCNN, the autoregressive baseline).

    Args:
        latent_dim: D.
        image_size: the side of the square binary images.
        enc_channels, enc_layers: the :class:`ResidualEncoder`'s.
        dec_channels, kernels, cond_channels, activation: the :class:`GatedPixelCNNDecoder`'s.

    ``encode(x) -> (mu, logvar)``; ``nll(x, z) -> [B]`` (the decoder's).

    Raises:
        ValueError: a bad ``activation``; at call time, bad images or latents (named).

    Example:
        >>> model = ImageVAE(latent_dim=2, image_size=8, enc_channels=4, enc_layers=2, dec_channels=4,
        ...                  kernels=(3, 3))
        >>> x = torch.zeros(3, 1, 8, 8)
        >>> model.nll(x, model.encode(x)[0]).shape
        torch.Size([3])
    """

    def __init__(self, latent_dim: int = 32, image_size: int = 28, enc_channels: int = 64, enc_layers: int = 3,
                 dec_channels: int = 32, kernels: tuple = (9, 9, 9, 7, 7, 7, 5, 5, 5, 3, 3, 3),
                 cond_channels: int = 4, activation: str = "gelu"):
        super().__init__(
            latent_dim, ResidualEncoder(latent_dim, image_size, enc_channels, enc_layers) if latent_dim else None,
            GatedPixelCNNDecoder(latent_dim, image_size, dec_channels, tuple(kernels), cond_channels, activation))
