"""The embedded demo model: a tiny DeepSeek-V3 trained on arithmetic and word tasks.

It ships inside the package, so `zizhu chat` works with no download, and it is an end-to-end oracle:
its greedy answers are either right or wrong. `python -m zizhu.demo.train` rebuilds it from a seed.
"""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).parent / "model"
