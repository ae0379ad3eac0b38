"""A small pre-norm vision transformer (Dosovitskiy et al., 2021)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional

from fedfuse.models.mlp import check_dropout, check_positive_ints

INIT_STD = 0.02  # the class token and position embedding start as N(0, 0.02²), as in ViT


class PatchEmbedding(nn.Module):
    """Image → tokens: patches embedded by a Conv2d (kernel = stride = patch_size), a learned class
    token prepended, a learned position embedding added (then dropout).

    Its output opens the transformer's residual stream; the class token and position embedding are
    parameters used outside a layer, which fusion fits as blocks (gradient variant).

    Input: images [N, in_channels, image_size, image_size]. Output: tokens [N, T + 1, dim] with
    T = (image_size / patch_size)², the class token first.
    """

    def __init__(
        self, in_channels: int, image_size: int, patch_size: int, dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        tokens = (image_size // patch_size) ** 2
        self.projection = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        nn.init.trunc_normal_(self.position, std=INIT_STD)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.projection(x).flatten(2).transpose(1, 2)  # [N, T, dim]
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return self.dropout(torch.cat([cls, patches], dim=1) + self.position)


class SelfAttention(nn.Module):
    """Multi-head self-attention: one Linear to queries, keys and values, scaled dot-product
    attention per head, one Linear back to ``dim``. Input and output: tokens [N, T, dim]."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        # [N, T, 3·dim] → 3 × [N, heads, T, dim / heads]
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mixed = functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))``; the MLP is
    Linear → GELU → Linear with ``mlp_ratio · dim`` hidden units, dropout after each sub-layer.

    Input and output: tokens [N, T, dim]. Fusion traces it into two blocks (the attention half and
    the MLP half, each from one point of the residual stream to the next), which add into the
    stream that the embedding opens.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout1(self.attention(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class ClassToken(nn.Module):
    """Tokens [N, T, dim] → the first (class) token [N, dim]."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class ViT(nn.Module):
    """A small pre-norm vision transformer: ``head(blocks(embed(x)))``.

    - ``embed``: `PatchEmbedding`, images → [N, T + 1, dim] (patch tokens, class token first).
    - ``blocks``: an `nn.Sequential` of ``depth`` `TransformerBlock` modules, [N, T + 1, dim] each.
    - ``head``: LayerNorm → the class token → Linear to the logits, [N, num_classes].

    Fusion finds its levels by tracing it (`fedfuse.describe_levels`): attention and LayerNorm make
    blocks that the gradient variant fits; the neurons of the residual stream are the ``dim``
    features of every token (the last dimension).

    Input: images [N, in_channels, image_size, image_size] with image_size divisible by
    patch_size. Output: logits [N, num_classes]. The position embedding is sized for
    ``image_size``, so a ViT takes only that size. The default patch of 4 divides 8, 28 and 32:
    4, 49 and 64 patch tokens.

    Args:
        in_channels: image channels (1 for greyscale).
        num_classes: output logits.
        image_size: height = width of the input images, in pixels.
        patch_size: height = width of a patch; must divide image_size.
        dim: token width (the residual stream's channels); divisible by heads. The defaults
            (dim 64, depth 4, mlp_ratio 2) make about 140k parameters.
        depth: transformer blocks.
        heads: attention heads.
        mlp_ratio: hidden units of a block's MLP per token channel.
        dropout: dropout probability after the embedding, in attention and after each sub-layer.

    Raises:
        ValueError: a non-positive size, a patch size that does not divide the image size, a dim
            not divisible by heads, or a dropout outside [0, 1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_ints(
            "ViT",
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=image_size,
            patch_size=patch_size,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
        )
        if image_size % patch_size:
            divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
            raise ValueError(
                f"ViT patch_size {patch_size} does not divide image_size {image_size}; "
                f"choose one of {divisors}"
            )
        if dim % heads:
            raise ValueError(f"ViT dim {dim} must be divisible by heads {heads}")
        check_dropout("ViT", dropout)
        self.embed = PatchEmbedding(in_channels, image_size, patch_size, dim, dropout)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.head = nn.Sequential(nn.LayerNorm(dim), ClassToken(), nn.Linear(dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.embed(x)))
