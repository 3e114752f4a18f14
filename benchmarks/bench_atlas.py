"""Atlas build time and memory for N sample subjects (issue 11; BENCHMARKS.md, "Atlas building").

Runs ``copdssl atlas`` on the first N subjects of :func:`pipeline.template.atlas_sample` of a
preprocessed cohort's work directory, once per N, in a child process, and prints wall time and
the child's peak RSS. With ``--spacing-mm`` the cohort's lung masks are first resampled (nearest
neighbour) to that spacing in a scratch work directory, so a 2 mm science cohort can stand in for
full-resolution masks (the atlas reads masks only; its registrations run on a 5 mm working grid).

    python -m benchmarks.bench_atlas --work benchmarks/out/science/seed1001/work --n 20 50 --spacing-mm 1
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def resampled_work(work: Path, sids: list[str], spacing_mm: float, scratch: Path) -> Path:
    """A work directory under ``scratch`` with the lung masks (and lung status) of ``sids`` at ``spacing_mm``."""
    import SimpleITK as sitk

    from pipeline.layout import Layout

    source, target = Layout(work=work), Layout(work=scratch / "work")
    target.lung("x").parent.mkdir(parents=True, exist_ok=True)
    target.status("lung", "x").parent.mkdir(parents=True, exist_ok=True)
    for sid in sids:
        image = sitk.ReadImage(str(source.lung(sid)))
        old = image.GetSpacing()
        size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(image.GetSize(), old)]
        # the same physical extent: the first new voxel centre half a new voxel inside the old first voxel's edge
        origin = image.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 * spacing_mm / s for s in old])
        resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor, origin, [spacing_mm] * 3,
                                  image.GetDirection(), 0, image.GetPixelID())
        sitk.WriteImage(resampled, str(target.lung(sid)), useCompression=True)
        shutil.copyfile(source.status("lung", sid), target.status("lung", sid))
    return target.work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="a preprocessed cohort's work directory")
    parser.add_argument("--n", nargs="+", type=int, default=[20, 50], help="sample sizes")
    parser.add_argument("--spacing-mm", type=float, help="resample the lung masks to this spacing first")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--step", type=int, default=13)
    args = parser.parse_args(argv)

    from pipeline.manifest import read_subjects
    from pipeline.template import atlas_sample

    sids = [s.sid for s in read_subjects(args.work / "subjects.tsv")]
    with tempfile.TemporaryDirectory(prefix="bench_atlas_") as tmp:
        scratch = Path(tmp)
        work = args.work
        if args.spacing_mm:
            work = resampled_work(args.work, atlas_sample(sids, max(args.n)), args.spacing_mm, scratch)
        settings = {"patch_size": args.patch_size, "step": args.step}  # the rest: the schema's defaults
        for n in args.n:
            command = [sys.executable, "-m", "pipeline", "atlas", "--sids", *atlas_sample(sids, n), "--work", str(work),
                       "--out-atlas", str(scratch / f"atlas{n}.nii.gz"), "--out-grid", str(scratch / f"grid{n}.npz"),
                       "--settings", json.dumps({**settings, "build_subjects": n})]
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - started
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
            print(json.dumps({"n": n, "spacing_mm": args.spacing_mm, "seconds": round(seconds, 1),
                              "peak_rss_mb_so_far": round(peak_mb)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
