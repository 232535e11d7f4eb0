"""symlog / symexp and two-hot labels over bins spaced evenly in symlog space (paper App. B, Eqs. 5-8)."""

import torch


def symlog(x: torch.Tensor) -> torch.Tensor:
    """Eq. 7: sign(x) * ln(|x| + 1)."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Eq. 8: the inverse of symlog, sign(x) * (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(x.abs())


def bin_supports(num_bins: int, low: float = -1e5, high: float = 1e5) -> torch.Tensor:
    """B bin centres spaced evenly between symlog(low) and symlog(high) (paper: wide limits +-1e5)."""
    return torch.linspace(float(symlog(torch.tensor(low))), float(symlog(torch.tensor(high))), num_bins)


def twohot(x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Two-hot label of x (already in symlog space) over `bins`: (...) -> (..., B).

    The two bins around x share the mass and the NEARER bin gets the larger weight (the paper's
    Eqs. 5-6 print the two weights swapped). Values outside the support go to the edge bin.
    """
    x = x.clamp(bins[0], bins[-1])
    hi = torch.searchsorted(bins, x.detach().contiguous(), right=True).clamp(1, len(bins) - 1)
    lo = hi - 1
    w_hi = ((x - bins[lo]) / (bins[hi] - bins[lo])).clamp(0.0, 1.0)
    label = torch.zeros(*x.shape, len(bins), dtype=x.dtype, device=x.device)
    label.scatter_(-1, lo.unsqueeze(-1), (1.0 - w_hi).unsqueeze(-1))
    label.scatter_add_(-1, hi.unsqueeze(-1), w_hi.unsqueeze(-1))
    return label


def bins_to_scalar(probs: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Scalar value of a bin distribution: the expectation in symlog space, then symexp. (..., B) -> (...).

    Always fp32, also under bf16 autocast (which would run the matmul in bf16): a bf16 expectation in symlog
    space is off by percents at Q ~ 1e3-1e4, enough to flip the sign of small CRR advantages."""
    dtype = torch.promote_types(probs.dtype, torch.float32)  # bf16 -> fp32; fp64 stays fp64
    with torch.autocast(probs.device.type, enabled=False):
        return symexp(probs.to(dtype) @ bins.to(dtype))
