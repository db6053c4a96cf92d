"""The built-in CPU platform."""

from __future__ import annotations

import os

import torch

from zizhu.platforms.base import Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    distributed_backend = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def default_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        # Most CPUs emulate bf16 matmuls, which is slower than fp32; choose bf16 explicitly if yours has AMX.
        return torch.float32

    def available_memory(self) -> int:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def configure(self) -> None:
        threads = os.environ.get("ZIZHU_NUM_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
