"""The three Mugs heads (spec 2.4); layer indices match the release's state-dict keys."""

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, *, nlayers: int = 3, bias: bool, use_bn: bool) -> nn.Sequential:
    """Linear [BN] GELU ... Linear; `nlayers` linear layers, no norm or activation after the last."""
    layers: list[nn.Module] = []
    for i in range(nlayers):
        last = i == nlayers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=bias))
        if not last:
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class ProjectionHead(nn.Module):
    """Instance and local-group head: bias-free projector D-h-h-E, and on the student a predictor E-hp-E.

    Without a predictor (the teacher) the output is the normalised projection (the InfoNCE target); with one
    (the student) it is normalise(predictor(normalise(projection))), the first normalise when `norm_before_pred`.
    The projector gets trunc_normal(0.02) init, the predictor PyTorch's default (as in the release).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 256,
        hidden_dim: int = 2048,
        pred_hidden_dim: int = 0,
        *,
        use_bn: bool = False,
        norm_before_pred: bool = True,
    ) -> None:
        super().__init__()
        self.norm_before_pred = norm_before_pred
        self.projector = mlp(in_dim, hidden_dim, out_dim, bias=False, use_bn=use_bn)
        self.projector.apply(_init_linear)
        self.predictor = None
        if pred_hidden_dim > 0:  # student only
            self.predictor = mlp(out_dim, pred_hidden_dim, out_dim, nlayers=2, bias=False, use_bn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E), L2-normalised rows."""
        z = self.projector(x)
        if self.predictor is None:
            return F.normalize(z, dim=-1)
        if self.norm_before_pred:
            z = F.normalize(z, dim=-1)
        return F.normalize(self.predictor(z), dim=-1)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight normalisation, w = g * v / ||v|| per output row.

    Same parameters (`weight_g` (out, 1), `weight_v` (out, in)) and maths as `torch.nn.utils.weight_norm(Linear)`,
    without its deprecated forward hook. `weight_g` starts at 1 and `weight_v` at nn.Linear's default init.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))  # (out, in)
        return F.linear(x, w)


class GroupHead(nn.Module):
    """Group head (DINO head): projector D-h-h-bottleneck with biases, L2-normalise, weight-normalised prototypes.

    With `norm_last_layer` the gain `weight_g` stays frozen at 1 (prototypes of unit norm).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        *,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.projector = mlp(in_dim, hidden_dim, bottleneck_dim, bias=True, use_bn=use_bn)
        self.projector.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> prototype logits (N, out_dim), fp32 even under autocast.

        The teacher sharpens these logits at temperature 0.04: bf16 rounding of them would move its top
        probabilities by up to a few per cent, so the prototype layer (a few % of the step's FLOPs) runs in fp32.
        """
        z = F.normalize(self.projector(x), dim=-1)  # (N, bottleneck)
        with torch.autocast(z.device.type, enabled=False):
            return self.last_layer(z.float())
