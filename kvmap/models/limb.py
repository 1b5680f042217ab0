"""The vision/limb-control policy: a small timm ViT that acts in the synthetic arm world (:mod:`kvmap.arm`).

Given the world's 64x64 image and an instruction (a colour, or none), it outputs the joint angles
that put the gripper on the disc of that colour (no instruction: keep the arm where it is).
"""
from __future__ import annotations

import torch
from torch import nn

from kvmap.arm import COLOURS, SIZE


class LimbPolicy(nn.Module):
    """A small ViT that reads the image plus an instruction token and outputs joint angles.

    Tokens: [class, 64 patches, instruction]; the instruction embedding (0 = none, 1..4 =
    :data:`kvmap.arm.COLOURS`) gets its own learned position. A linear head on the class token's output gives
    (sin t1, cos t1, sin t2, cos t2).

    Parameters
    ----------
    img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio : the ViT's shape.
    qk_norm : LayerNorm on queries and keys in every block. With it (and the sin-cos start of the
        position embedding) training leaves its initial plateau within a few hundred steps; without
        it the policy often predicts the mean pose for the whole of a short run.
    """

    model_id = "limb-vit"

    def __init__(self, img_size: int = SIZE, patch_size: int = 8, embed_dim: int = 192, depth: int = 6,
                 num_heads: int = 3, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        from timm.layers import build_sincos2d_pos_embed
        from timm.models.vision_transformer import VisionTransformer

        self.config = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm)
        self.vit = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                     num_heads=num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, num_classes=0,
                                     class_token=True)
        with torch.no_grad():  # learned positions, started from a 2D sin-cos code: precise from step one
            grid = list(self.vit.patch_embed.grid_size)
            self.vit.pos_embed[:, 1:] = build_sincos2d_pos_embed(grid, embed_dim)  # (1, P, C)
        self.instruction = nn.Embedding(len(COLOURS) + 1, embed_dim)
        self.instruction_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.instruction.weight, std=0.02)
        nn.init.trunc_normal_(self.instruction_pos, std=0.02)
        self.head = nn.Linear(embed_dim, 4)

    def tokens(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Input tokens of the blocks: (B, 3, H, W), (B,) -> (B, 1 + P + 1, C)."""
        vit = self.vit
        x = vit.patch_embed(images)  # (B, P, C)
        cls = vit.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + vit.pos_embed  # (B, 1 + P, C)
        instr = self.instruction(target)[:, None] + self.instruction_pos  # (B, 1, C)
        return vit.norm_pre(torch.cat([x, instr], dim=1))  # (B, 1 + P + 1, C)

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images, (B,) long instructions -> (B, 4) (sin t1, cos t1, sin t2, cos t2)."""
        x = self.vit.norm(self.vit.blocks(self.tokens(images, target)))  # (B, T, C)
        return self.head(x[:, 0])

    def port(self):
        """A :class:`~kvmap.models.vit.ViTMemoryPort` over this policy's blocks (model id ``limb-vit``)."""
        from kvmap.models.vit import ViTMemoryPort

        return ViTMemoryPort(self.vit.blocks, self.model_id)
