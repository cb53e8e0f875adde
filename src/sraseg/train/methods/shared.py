"""What more than one method family uses: the pre-training mix of two labeled halves, SRA-Seg's loss of
mixed images (BCP's `bcp_loss: soft` ablation uses it too), the pseudo-label ramp-up and the self-training
terms with the pseudo-labels' class fractions."""

from __future__ import annotations

import torch

from sraseg.blend.maps import mix
from sraseg.train.context import TrainContext
from sraseg.train.log_table import class_names
from sraseg.train.losses import one_hot, sigmoid_rampup, soft_dice_ce, soft_dice_ce_split
from sraseg.train.settings import TrainSettings

__all__ = ["TRUE_LABEL_WEIGHT", "mixed_labeled_halves", "mixed_loss", "soft_terms", "unlabeled_rampup",
           "selftrain_terms"]

# A true-label region or source weighs 1 (BCP's pseudo-labelled region: bcp.PSEUDO_LABEL_WEIGHT).
TRUE_LABEL_WEIGHT = 1.0


def mixed_labeled_halves(ctx: TrainContext, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-training's input: x = a*l_first + (1-a)*l_second, y = a*Y(l_first) + (1-a)*Y(l_second) over the two
    halves of an augmented labeled batch (BCP's pre-training; a soft map gives a continuous label).

    Returns:
        (a, x, y): the maps float [h,1,S,S] of `kind` (hard, gaussian, box), the mixed images float
        [h,1,S,S] and labels float [h,C,S,S], h = labeled_batch // 2.
    """
    images, labels = ctx.labeled_batch(ctx.cfg.labeled_batch)
    half = len(images) // 2
    a = ctx.blend_maps(half, kind)
    y = one_hot(labels, ctx.cfg.num_classes)
    x_mix = mix(a, images[:half], images[half : 2 * half])
    y_mix = mix(a, y[:half], y[half : 2 * half])
    return a, x_mix, y_mix


def _sum_terms(*terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: sum(t[k] for t in terms) for k in terms[0]}


def mixed_loss(logits: torch.Tensor, target: torch.Tensor, share: torch.Tensor, first_weight: float,
               form: str, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SRA-Seg's loss (loss, dice_loss, ce_loss) of mixed images whose first source holds share m = `share`
    [B,1,H,W] of each pixel (self-training: the pseudo-labelled image, weighted w = `first_weight`;
    pre-training: a labeled image, w = 1). form (`train.sraseg_loss`), in both phases:
    - soft: the reference's soft loss; w = 1 is the reference's call as ever, any other w weighs each pixel
      1 - (1 - w)*m in the Dice sums and the CE mean;
    - batch_soft: the same with batch Dice (sums over the sub-batch's pixels, BCP's Dice);
    - region: BCP's region loss over the shares, (w*L(m) + L(1-m)) / 2 with L(m) the batch-Dice soft loss
      weighted by m: each source's pixels normalised by their own mass. With a hard map it is exactly
      `bcp_region_loss` with weights w and 1.
    `keep` [B,1,H,W] (`pseudo_min_confidence`): where it is 0, the first source's share of the pixel drops
    out of the loss (its label is one the teacher is unsure of); None keeps every pixel."""
    batch_dice = form != "soft"
    kept = share if keep is None else share * keep  # the first source's share its label may teach
    if form == "region":
        first = soft_dice_ce(logits, target, weight=kept, batch_dice=True)
        second = soft_dice_ce(logits, target, weight=1.0 - share, batch_dice=True)
        return {key: (first_weight * f + s) / 2.0 for key, f, s in zip(("loss", "dice_loss", "ce_loss"), first, second)}
    weight = None if first_weight == 1.0 else 1.0 - (1.0 - first_weight) * share
    if keep is not None:
        weight = (1.0 - share + kept) * (1.0 if weight is None else weight)
    loss, dice, ce = soft_dice_ce(logits, target, weight=weight, batch_dice=batch_dice)
    return {"loss": loss, "dice_loss": dice, "ce_loss": ce}


def soft_terms(logits: torch.Tensor, target: torch.Tensor, pseudo_share: torch.Tensor,
               pseudo_weight: float, form: str = "soft", keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SRA-Seg's self-training loss of mixed images whose pseudo-labelled image holds share m =
    `pseudo_share` of each pixel (`mixed_loss`), and its parts loss_pseudo, loss_true
    (`soft_dice_ce_split`, no gradient; batch Dice for batch_soft and region, as the loss)."""
    terms = mixed_loss(logits, target, pseudo_share, pseudo_weight, form, keep)
    with torch.no_grad():
        terms["loss_pseudo"], terms["loss_true"] = soft_dice_ce_split(logits.detach(), target, pseudo_share,
                                                                      batch_dice=form != "soft")
    return terms


def unlabeled_rampup(ctx: TrainContext) -> float:
    """The ramp-up factor of the pseudo-labelled part at this self-training step (1 without a ramp-up):
    a host float from the step counter, so the step reads nothing back."""
    return sigmoid_rampup(ctx.step - ctx.cfg.pretrain_iterations, ctx.cfg.unlabeled_rampup)


def selftrain_terms(cfg: TrainSettings, per_image: list[dict[str, torch.Tensor]],
                    pseudo: torch.Tensor, average: bool = False) -> dict[str, torch.Tensor]:
    """The terms of a self-train step: the mixed images' terms summed (BCP, the reference) or averaged
    (`average`), and pl_frac_<class>, each class's share of the pseudo-labels' pixels
    (`pseudo`: one-hot float [B,C,H,W]), kept on the device like the losses."""
    terms = _sum_terms(*per_image)
    if average:
        terms = {k: v / len(per_image) for k, v in terms.items()}
    fractions = pseudo.detach().float().mean(dim=(0, 2, 3))
    terms.update({f"pl_frac_{name}": fractions[c] for c, name in enumerate(class_names(cfg.num_classes), start=1)})
    return terms

