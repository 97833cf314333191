"""Soft nearest-neighbour classification at evaluation scale (PAWS-NN).

The same probabilities as :func:`paws.method.losses.snn` with one-hot labels, for any number of
queries and supports: supports are processed in chunks with a streaming softmax, so memory
stays bounded by one (queries, chunk) block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["snn_classify"]


@torch.no_grad()
def snn_classify(
    queries: torch.Tensor,
    supports: torch.Tensor,
    support_labels: torch.Tensor,
    num_classes: int,
    tau: float = 0.1,
    chunk_size: int = 8192,
    query_batch: int = 1024,
) -> torch.Tensor:
    """Soft nearest-neighbour class probabilities, chunked over supports and queries.

    Equal to ``snn(queries, supports, one_hot(support_labels), tau)`` but never materialises
    more than (query_batch, chunk_size) similarities.

    Args:
        queries: (N, D) embeddings.
        supports: (S, D) embeddings of labelled images.
        support_labels: (S,) int class ids.
        num_classes: K.
        tau: temperature.
        chunk_size: supports per chunk.
        query_batch: queries per block.

    Returns:
        (N, K) probabilities.
    """
    # 1/tau is folded into the queries, and one similarity block is reused for every chunk:
    # exp in place, then a product with the chunk's one-hot labels sums it per class.
    q_all = F.normalize(queries.float(), dim=1).div_(tau)
    s_all = F.normalize(supports.float(), dim=1)
    labels = support_labels.to(s_all.device).long()
    block = q_all.new_empty(min(query_batch, len(q_all)), min(chunk_size, len(s_all)))
    out = []
    for q in q_all.split(query_batch):
        running_max = torch.full((len(q), 1), float("-inf"), device=q.device)
        class_sums = torch.zeros(len(q), num_classes, device=q.device)
        for s, y in zip(s_all.split(chunk_size), labels.split(chunk_size)):
            full = len(q) == block.shape[0] and len(s) == block.shape[1]
            logits = torch.mm(q, s.T, out=block) if full else q @ s.T
            new_max = torch.maximum(running_max, logits.amax(dim=1, keepdim=True))
            class_sums.mul_(torch.exp(running_max - new_max))
            onehot = F.one_hot(y, num_classes).to(logits.dtype)
            class_sums.addmm_(logits.sub_(new_max).exp_(), onehot)
            running_max = new_max
        out.append(class_sums / class_sums.sum(dim=1, keepdim=True))
    return torch.cat(out)
