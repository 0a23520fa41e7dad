"""Host memory a ZeRO-3 rank needs to start: the ~75M Qwen2 of bench/peer_trl_grpo.py (float32, CPU, one process
per rank), built partitioned and streamed in module by module (trainer.partitioned_init, the default) against every
rank loading the whole model first (trainer.partitioned_init: false, the code before), in the same run.

Each rank's peak resident memory over `TrainerRank.setup` (model and DeepSpeed engine) and over building the model
alone is read as tests/capacity_measure.py describes (`measure_setup`).

    python bench/zero3_init.py [--ranks 2 4]   # ends with {"metric": "zero3_setup_host_memory_vs_whole_loading", ...}
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import machine, result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from capacity_measure import measure_setup  # noqa: E402

QWEN2_75M = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 2,
             "intermediate_size": 2048}
MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "rayrlhf-bench-qwen2-75m")
    args = parser.parse_args()
    from rayrlhf.models.architectures import build_architecture

    if not (args.model_dir / "config.json").is_file():
        build_architecture("qwen2", args.model_dir, **QWEN2_75M)
    size = (args.model_dir / "model.safetensors").stat().st_size / MiB
    print(f"# {machine()}; model {size:.0f} MiB in float32", flush=True)
    figures = {}
    for n in args.ranks:
        for partitioned in (False, True):
            peaks = measure_setup(args.model_dir, n, partitioned)
            top = {k: max(p[k] for p in peaks) / MiB for k in peaks[0]}
            figures[(n, partitioned)] = top
            print(f"{n} ranks, {'partitioned' if partitioned else 'whole'}: largest rank peak "
                  + ", ".join(f"{k} {v:.0f} MiB" for k, v in top.items()), flush=True)
    n = max(args.ranks)
    new, old = figures[(n, True)]["setup"], figures[(n, False)]["setup"]
    # lower is better: the value is a rank's setup peak inverted (1/GiB), so the ratio is whole / partitioned
    result("zero3_setup_host_memory_vs_whole_loading", 1024 / new, 1024 / old, ranks=n, unit="1/GiB",
           partitioned_mib=round(new), whole_mib=round(old),
           construction_mib={str(k): round(figures[(k, True)]["construction"]) for k in args.ranks},
           model_mib=round(size))


if __name__ == "__main__":
    main()
