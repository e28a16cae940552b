from robust_fast.ops.pgd import pgd_step

__all__ = ["pgd_step"]
