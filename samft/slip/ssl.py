"""Self-supervision on unlabelled images: SimCLR's NT-Xent as SLIP trains it (Mu et al., ECCV 2022).

    two augmented views (B, 3, S, S) each  (samft.data.unlabelled: SLIP's augmentation, SAM's normalisation)
      -> PEFT-adapted image encoder, neck            -> (B, C, S/16, S/16) per view
      -> global average pool                         -> (B, C)          ssl_features
      -> projection MLP (SSLHead, BatchNorm)          -> (B, emb_dim)    per view, as SLIP's image_mlp
      -> NT-Xent over both views                      -> scalar          nt_xent

This restates SLIP's ``SIMCLRLoss`` (``losses.py``): the embeddings are L2-normalised; anchor ``i`` of
view a has its view-b twin as the positive and 2N-2 negatives (the other N-1 samples of each view, N =
the global batch), its own similarity excluded; the loss is the cross-entropy of those logits divided by
the temperature, averaged over both views. Under DDP every process contrasts its own anchors against the
embeddings of all processes, gathered **with** gradient (``torch.distributed.nn.functional.all_gather``),
so that the negatives of the other processes get gradients too (the reference gathers its CLIP
embeddings without, its issue #31). With DDP's gradient averaging the update is that of the loss on the
union batch.

The projection head is SLIP's ``_build_mlp``: Linear-BN-ReLU-Linear-BN-ReLU-Linear. SLIP uses
``nn.SyncBatchNorm``; PyTorch's refuses CPU tensors (gloo), so :func:`convert_sync_batchnorm` turns the
head's BatchNorm layers into :class:`DistBatchNorm1d`, which reduces the batch statistics over all
processes with differentiable all-reduces on any device, and is plain BatchNorm in a single process.
The head is a training-time helper: it is thrown away after training.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective(name: str, tensor: torch.Tensor):
    """``torch.distributed.nn.functional.<name>(tensor)`` (a collective with a gradient) without the
    FutureWarning it raises in recent PyTorch (its suggested replacement is a private module), which would
    otherwise be printed by every process of every training with the SSL loss."""
    from torch.distributed.nn import functional

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                                category=FutureWarning)
        return getattr(functional, name)(tensor)


def build_mlp(in_dim: int, mlp_dim: int, out_dim: int) -> nn.Sequential:
    """SLIP's projection MLP: (N, in_dim) -> (N, out_dim); BatchNorm1d after the two hidden Linears."""
    return nn.Sequential(OrderedDict([
        ("layer1", nn.Linear(in_dim, mlp_dim)),
        ("bn1", nn.BatchNorm1d(mlp_dim)),
        ("relu1", nn.ReLU(inplace=True)),
        ("layer2", nn.Linear(mlp_dim, mlp_dim)),
        ("bn2", nn.BatchNorm1d(mlp_dim)),
        ("relu2", nn.ReLU(inplace=True)),
        ("layer3", nn.Linear(mlp_dim, out_dim)),
    ]))


class SSLHead(nn.Module):
    """The SimCLR projection head: pooled features (N, in_dim) -> embeddings (N, emb_dim)."""

    def __init__(self, in_dim: int, mlp_dim: int = 4096, emb_dim: int = 256) -> None:
        super().__init__()
        self.mlp = build_mlp(in_dim, mlp_dim, emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class DistBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (N, C) whose training statistics are those of the batch of all processes.

    In training under an initialised process group of more than one process, the per-channel mean and
    (biased) variance are reduced with ``torch.distributed.nn.functional.all_reduce``, which has a
    gradient, so the result and its gradients equal BatchNorm on the concatenated batch. The running
    statistics are updated as BatchNorm does (unbiased variance of the global batch). Otherwise this is
    ``nn.BatchNorm1d``; the parameter and buffer names are the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world()[1] > 1):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"DistBatchNorm1d expects (N, C) inputs, got {tuple(x.shape)}")
        xf = x.float()
        count = xf.new_tensor([float(x.shape[0])])
        total = _collective("all_reduce", torch.cat([xf.sum(0), count]))
        n = total[-1].detach()
        mean = total[:-1] / n
        var = _collective("all_reduce", ((xf - mean) ** 2).sum(0)) / n
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), n)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / (n - 1)) if float(n) > 1 else var
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` in ``module`` by :class:`DistBatchNorm1d` (same tensors); returns it.

    Call it on the SSL head before wrapping in DDP, like ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, DistBatchNorm1d):
        new = DistBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=_device_of(module))
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child))
    return module


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(N, D) on each process -> (world * N, D), rank order, differentiable; ``x`` itself when undistributed.

    Every process must pass the same N (``drop_last`` in the unlabelled loader): a ValueError otherwise.
    """
    if _world()[1] == 1:
        return x
    sizes = torch.tensor([x.shape[0], -x.shape[0]], device=x.device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    if int(sizes[0]) != -int(sizes[1]):
        raise ValueError(f"the SSL batch differs between processes ({-int(sizes[1])} to {int(sizes[0])} "
                         f"images): the unlabelled loader must drop its last incomplete batch")

    return torch.cat(_collective("all_gather", x), dim=0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent as SLIP's ``SIMCLRLoss``: embeddings of two views (N, D) each -> scalar (float32).

    Anchor i of view a: logits ``[a_i . b_j / t for all j] + [a_i . a_j / t for j != i]`` over the global
    batch (gathered under DDP), target ``b_i``; the same for view b; the mean of the two mean losses.
    """
    q_a, q_b = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    k_a, k_b = gather_with_grad(q_a), gather_with_grad(q_b)
    rank, _ = _world()
    n = q_a.shape[0]
    labels = rank * n + torch.arange(n, device=q_a.device)
    own = F.one_hot(labels, k_a.shape[0]).bool()
    logits_aa = (q_a @ k_a.t() / temperature).masked_fill(own, float("-inf"))
    logits_bb = (q_b @ k_b.t() / temperature).masked_fill(own, float("-inf"))
    logits_ab = q_a @ k_b.t() / temperature
    logits_ba = q_b @ k_a.t() / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return (loss_a + loss_b) / 2


HEAD_SEED_SALT = 0x5511  # the heads' own seed: train.seed + this


def build_ssl_head(cfg, in_dim: int) -> Optional[SSLHead]:
    """The projection head of ``cfg.loss.ssl`` for neck features of width ``in_dim``, or None when the
    SSL loss is off (weight 0: nothing is built). Initialised from its own seed (``train.seed`` + a salt)
    without touching the global RNG, so the rest of training draws the same numbers with or without it.
    Under torchrun the training set-up synchronises its BatchNorm (``samft.engine.train.setup._bind_modules``:
    :func:`convert_sync_batchnorm`).
    """
    s = cfg.loss.ssl
    if s.weight == 0:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + HEAD_SEED_SALT)
        head = SSLHead(in_dim, s.mlp_dim, s.emb_dim)
    return head


def ssl_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, C): the PEFT-adapted encoder's neck features (``model.encode``), averaged over space.

    ``model`` is a ``SemanticSAM`` (not its DDP wrapper). ``encode`` opens no aux-loss sink, so the PEFT
    layers compute no auxiliary loss in this pass (Conv-LoRA's balance loss is the labelled stream's,
    ``model(images).aux_losses``).
    """
    feats = model.encode(images)
    return feats.float().mean(dim=(2, 3))


def ssl_loss(model: nn.Module, head: nn.Module, view1: torch.Tensor, view2: torch.Tensor,
             temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent of two views (B, 3, S, S) of the same images through the encoder and the head -> scalar.

    Both views go through the encoder as one batch of 2B (the encoder has no batch statistics: each image's
    features are those of a separate pass, up to random gate noise); the head runs per view, so its
    BatchNorm statistics are per view, as SLIP's ``image_mlp(visual(aug1))``, ``image_mlp(visual(aug2))``.
    """
    b = view1.shape[0]
    pooled = ssl_features(model, torch.cat([view1, view2], dim=0))
    return nt_xent(head(pooled[:b]), head(pooled[b:]), temperature)
