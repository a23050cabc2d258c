"""Two-way transformer of the SAM mask decoder.

Prompt/output tokens and image tokens update each other: tokens self-attend, attend to the
image, pass an MLP, then the image attends back to the tokens. Positional encodings are re-added
to queries and keys at every attention (never to values).
"""
from __future__ import annotations

from torch import Tensor, nn

from .attention import Attention
from .common import MLP


class TwoWayAttentionBlock(nn.Module):
    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        """skip_first_layer_pe: in the first block the tokens *are* their PE, so self-attention
        uses them as-is and replaces (rather than adds to) the tokens."""
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)

        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)

        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2, activation=activation,
                       batch_invariant=True)
        self.norm3 = nn.LayerNorm(embedding_dim)

        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)

        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        # queries/query_pe: [B, Nt, C] tokens; keys/key_pe: [B, Nimg, C] image tokens
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            tokens_with_pe = queries + query_pe
            queries = queries + self.self_attn(q=tokens_with_pe, k=tokens_with_pe, v=queries)
        queries = self.norm1(queries)

        image_with_pe = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=queries + query_pe, k=image_with_pe, v=keys))

        queries = self.norm3(queries + self.mlp(queries))

        keys = self.norm4(keys + self.cross_attn_image_to_token(q=image_with_pe, k=queries + query_pe, v=queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """image_embedding, image_pe: [B, C, H, W]; point_embedding: [B, Nt, C].

        Returns updated tokens [B, Nt, C] and image tokens [B, H*W, C].
        """
        assert image_embedding.shape == image_pe.shape, "image_pe must match image_embedding"
        assert point_embedding.shape[0] == image_embedding.shape[0]
        image_tokens = image_embedding.flatten(2).transpose(1, 2)  # [B, HW, C]
        image_pe_tokens = image_pe.flatten(2).transpose(1, 2)

        queries, keys = point_embedding, image_tokens
        for block in self.layers:
            queries, keys = block(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe_tokens)

        attn_out = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + image_pe_tokens, v=keys)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys
