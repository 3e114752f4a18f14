"""Batched on-device augmentation vs per-sample CPU MONAI transforms, measured in one run.

    python -m benchmarks.bench_augment [--device cpu|cuda] [--batch 64] [--sizes 16 32]

For each patch size the same random batch ``[N, 1, S, S, S]`` (normalised intensities) goes
through

* ``monai_matched``: per sample on the CPU, ``Compose([OneOf([Rand3DElastic, RandAffine],
  weights=[elastic_prob, 1 - elastic_prob]), RandGaussianNoise(p=noise_prob),
  RandAdjustContrast(p=contrast_prob)])`` with the same rotation / scale / translation ranges:
  the per-sample equivalent of :class:`models.augment.BatchedAugment` (the baseline of the ratio);
* ``monai_elastic`` / ``monai_affine``: the same with ``Rand3DElastic`` (p=1) or ``RandAffine``
  (p=1) as the spatial step, for reference;
* ``batched``: :class:`BatchedAugment` on ``--device`` with a generator on that device.

MONAI runs with ``set_track_meta(False)`` (its fastest mode). Both sides use ``--threads`` torch
threads (default 1, the per-core comparison: per-sample MONAI would run one sample per
DataLoader worker, and giving it more threads per sample only oversubscribes the cores). Rand3DElastic's sigma/magnitude
parametrise a smoothed dense noise field, ours a coarse control grid: the ranges are matched
by value, the fields are not identical. Results go to ``benchmarks/out/augment.json`` and a
markdown table is printed. The methods are timed in interleaved rounds and medians reported,
so that load from other processes hits all of them alike; the JSON records the load average
before and after (numbers from a shared machine are contended).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "augment.json"


def _monai_pipelines(aug, size: int, seed: int) -> dict:
    from monai.transforms import (Compose, OneOf, Rand3DElastic, RandAdjustContrast, RandAffine,
                                  RandGaussianNoise)

    rotate = [math.radians(aug.rotation_deg)] * 3
    scale = [aug.scale] * 3
    translate = [aug.translation * size] * 3
    spatial = {"rotate_range": rotate, "scale_range": scale, "translate_range": translate,
               "padding_mode": "zeros", "mode": "bilinear"}

    def elastic():
        return Rand3DElastic(prob=1.0, sigma_range=(aug.elastic_sigma, aug.elastic_sigma),
                             magnitude_range=(aug.elastic_magnitude, aug.elastic_magnitude), **spatial)

    def intensity():
        return [RandGaussianNoise(prob=aug.noise_prob, std=aug.noise_std, sample_std=False),
                RandAdjustContrast(prob=aug.contrast_prob, gamma=aug.contrast_gamma)]

    pipelines = {
        "monai_matched": Compose([OneOf([elastic(), RandAffine(prob=1.0, **spatial)],
                                        weights=[aug.elastic_prob, 1.0 - aug.elastic_prob]), *intensity()]),
        "monai_elastic": Compose([elastic(), *intensity()]),
        "monai_affine": Compose([RandAffine(prob=1.0, **spatial), *intensity()]),
    }
    for pipeline in pipelines.values():
        pipeline.set_random_state(seed)
    return pipelines


def _time_monai(pipeline, x) -> float:
    """Seconds for one pass over the batch, one sample at a time (results stacked)."""
    import torch

    start = time.perf_counter()
    torch.stack([torch.as_tensor(pipeline(sample)) for sample in x])
    return time.perf_counter() - start


def _time_batched(aug, x, generator) -> float:
    """Seconds of one batched call (device synchronised)."""
    import torch

    start = time.perf_counter()
    aug(x, generator)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def run(device: str, batch: int, sizes: list[int], rounds: int, repeats: int, seed: int, threads: int = 1) -> dict:
    """Time every method in ``rounds`` interleaved rounds (so that load from other processes hits
    all of them alike) and report medians: per round one pass of each MONAI pipeline over the
    batch and ``repeats`` batched calls."""
    import monai
    import torch
    from monai.data import set_track_meta

    from models.augment import BatchedAugment

    torch.set_num_threads(threads)
    set_track_meta(False)
    aug = BatchedAugment()
    load_before = os.getloadavg()
    rows = []
    for size in sizes:
        data_gen = torch.Generator().manual_seed(seed)
        x_cpu = torch.rand(batch, 1, size, size, size, generator=data_gen) * 1.2 - 1.0
        x = x_cpu.to(device)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        pipelines = _monai_pipelines(aug, size, seed)
        for _ in range(2):  # warm-up (allocator, kernels)
            _time_batched(aug, x, generator)
        seconds: dict[str, list[float]] = {name: [] for name in [*pipelines, "batched"]}
        for _ in range(rounds):
            for name, pipeline in pipelines.items():
                seconds[name].append(_time_monai(pipeline, x_cpu))
            seconds["batched"] += [_time_batched(aug, x, generator) for _ in range(repeats)]
        row = {"size": size, "batch": batch}
        row.update({f"{name}_samples_per_s": batch / _median(values) for name, values in seconds.items()})
        row["ratio_vs_matched"] = row["batched_samples_per_s"] / row["monai_matched_samples_per_s"]
        row["ratio_vs_affine"] = row["batched_samples_per_s"] / row["monai_affine_samples_per_s"]
        rows.append(row)
    return {
        "benchmark": "augment",
        "command": f"python -m benchmarks.bench_augment --device {device} --batch {batch} "
                   f"--sizes {' '.join(map(str, sizes))} --rounds {rounds} --repeats {repeats} --threads {threads}",
        "device": device if device == "cpu" else torch.cuda.get_device_name(torch.device(device)),
        "monai_device": "cpu (one sample at a time)",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "settings": aug.extra_repr(),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [f"augmentation, batch {result['rows'][0]['batch']}, batched on {result['device']} "
             f"({result['torch_threads']} torch threads; load {result['load_average_before'][0]:.2f} before)",
             "",
             "| S | MONAI matched /s | MONAI elastic /s | MONAI affine /s | batched /s | × matched | × affine |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['size']} | {row['monai_matched_samples_per_s']:.0f} | "
                     f"{row['monai_elastic_samples_per_s']:.0f} | {row['monai_affine_samples_per_s']:.0f} | "
                     f"{row['batched_samples_per_s']:.0f} | {row['ratio_vs_matched']:.1f} | "
                     f"{row['ratio_vs_affine']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="where the batched augmentation runs (cpu, cuda)")
    parser.add_argument("--batch", type=int, default=64, help="samples per batch (default %(default)s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="patch sizes")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians reported)")
    parser.add_argument("--repeats", type=int, default=3, help="batched calls per round")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (default %(default)s: per-sample MONAI runs one "
                             "sample per DataLoader worker, and more threads per sample only oversubscribe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT), help="JSON output (default %(default)s)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda requested but CUDA is not available")
    result = run(args.device, args.batch, args.sizes, args.rounds, args.repeats, args.seed, args.threads)
    from pipeline.files import write_json

    write_json(args.out, result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
