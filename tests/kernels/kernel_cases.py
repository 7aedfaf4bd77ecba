"""Shared builders for the kernel tests: random layouts and their dense masked equivalents."""
import torch

from sparse_dc.kernels import BlockLayout


def random_mask(nbr: int, nbc: int, density: float, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """bool [nbr, nbc] with round(density * nbr * nbc) live blocks (at least one unless density == 0)."""
    g = torch.Generator().manual_seed(seed)
    n = nbr * nbc
    k = 0 if density == 0 else max(1, round(density * n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:k]] = True
    return mask.reshape(nbr, nbc).to(device)


def random_case(n_out: int, k_in: int, b: int, density: float, dtype=torch.float32, seed: int = 0,
                device: str = "cpu", shuffle_slots: bool = True):
    """(layout, values, dense masked weight). With shuffle_slots, one topology update has run so that
    slot != CSR order (the indirection is exercised). The dense weight is the random matrix times the block mask
    expanded to entries: built without the layout, so it is an oracle for the layout's conversions too."""
    g = torch.Generator().manual_seed(seed + 1)
    mask = random_mask(n_out // b, k_in // b, density, seed, device)
    layout = BlockLayout.from_block_mask(mask, b)
    if shuffle_slots and 0 < layout.nnz < mask.numel():
        # Move one live block to a dead position: its slot is reused, so slots are no longer row-major.
        flat = mask.reshape(-1).clone()
        live, dead = flat.nonzero()[0, 0], (~flat).nonzero()[-1, 0]
        flat[live], flat[dead] = False, True
        mask = flat.reshape(mask.shape)
        layout, _ = layout.with_mask(mask)
    w = torch.randn(n_out, k_in, generator=g).to(device=device, dtype=dtype)
    values = layout.values_from_dense(w).contiguous()
    live = mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return layout, values, w * live
