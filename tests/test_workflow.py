"""The Snakemake workflow itself: dry runs, lint, the SLURM profile, and tiny end-to-end runs.

The end-to-end runs use the real rules and CLI on a tiny synthetic cohort (96x96x80 voxels,
4 mm working resolution, 8^3 patches, a few training steps), so they check wiring, file
contracts and failure isolation, not accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from pipeline.layout import Layout

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

pytestmark = pytest.mark.slow

TINY = {
    "synthetic": {"n_subjects": 12, "seed": 7, "shape": [96, 96, 80], "dicom_fraction": 0.25,
                  "reoriented_fraction": 0.25, "preview_subjects": 2},
    "ingest": {"spacing_mm": 4.0},
    "atlas": {"patch_size": 8, "step": 6, "min_lung_fraction": 0.25, "build_subjects": 5, "rounds": 2},
    "train": {"epochs": 1, "steps_per_epoch": 3, "batch_size": 4, "encoder": {"widths": [4, 8]},
              "moco": {"queue_size": 8},
              "graph": {"epochs": 2, "batch_size": 4, "queue_size": 8, "hidden_dim": 16}},
    "runs": {"random_init": {"epochs": 0, "graph": {"enabled": False}},
             "moco": {"loss": {"method": "none"}},
             "ifm_e0.5": {"loss": {"method": "ifm", "epsilon": 0.5}}},
    "embed": {"batch_size": 64},
    "evaluate": {"n_folds": 3, "repeats": 2, "inner_folds": 2, "pca_components": [2],
                 "ridge_alphas": [1.0, 100.0]},
    # one location map (420 locations x 3 targets x 3 folds of ridge fits, ~40 s): the default maps every trained run
    "report": {"location_map_runs": ["moco"]},
}


def write_config(directory: Path, config: dict) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(directory: Path, config: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(directory),
                           "--configfile", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def jobs_of(dry_run_output: str) -> dict[str, int]:
    """Job counts from the 'Job stats' table of a dry run."""
    counts, in_table = {}, False
    for line in dry_run_output.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
                counts[parts[0]] = int(parts[1])
            elif parts and parts[0] == "total":
                break
    return counts


def test_default_config_dry_run_and_lint(tmp_path):
    config = ROOT / "config" / "config.yaml"
    dry = snakemake(tmp_path, config, "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = jobs_of(dry.stdout + dry.stderr)
    n = yaml.safe_load(config.read_text())["synthetic"]["n_subjects"]
    assert jobs["ingest"] == jobs["lung"] == jobs["register"] == jobs["patches"] == n
    assert jobs["cohort"] == 1 and jobs["report"] == 1
    assert jobs["train"] == len(yaml.safe_load(config.read_text())["runs"])
    lint = snakemake(tmp_path, config, "--lint")
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]
    assert "Congratulations, your workflow is in a good condition" in lint.stdout + lint.stderr


def placeholder_cohort(directory: Path, n_subjects: int = 3) -> Path:
    """A manifest of empty placeholder images (enough for dry runs) and its config."""
    (directory / "img").mkdir()
    rows = ["sid\timage"]
    for i in range(n_subjects):
        (directory / "img" / f"S{i}.nii.gz").touch()
        rows.append(f"S{i}\timg/S{i}.nii.gz")
    (directory / "manifest.tsv").write_text("\n".join(rows) + "\n")
    (directory / "pheno.tsv").write_text("sid\tFEV1pp_utah\n")
    return write_config(directory, {"cohort": {"source": "manifest", "manifest": str(directory / "manifest.tsv"),
                                               "phenotypes": str(directory / "pheno.tsv")},
                                    "runs": {"moco": {}}, "evaluate": {"baselines": ["densitometry"]}})


def job_fields(dry_run_output: str, field: str) -> list[tuple[str, list[str]]]:
    """(rule name, comma-separated items of ``field``) for every job of a dry run's listing that has the field."""
    jobs, rule = [], None
    for line in dry_run_output.splitlines():
        line = line.strip()
        if line.startswith("rule ") and line.endswith(":"):
            rule = line[5:-1]
        elif line.startswith(f"{field}:") and rule:
            jobs.append((rule, line[len(field) + 1:].strip().split(", ")))
    return jobs


def inputs_per_job(dry_run_output: str) -> dict[str, int]:
    """Rule name -> the largest number of input files of one of its jobs in a dry run's listing."""
    counts: dict[str, int] = {}
    for rule, inputs in job_fields(dry_run_output, "input"):
        counts[rule] = max(counts.get(rule, 0), len(inputs))
    return counts


def test_dag_grows_linearly_with_the_cohort(tmp_path):
    """Only the status tables list per-subject files, and the atlas its sample's (at most
    atlas.build_subjects subjects: a lung mask and a status each); every other aggregate rule has the
    same inputs for 3 and 6 subjects, and per-subject rules declare their data inputs only. This is
    what keeps `snakemake -n` linear at 10,000 subjects (benchmarks/bench_dag.py times it)."""
    counts = {}
    for n in (3, 6):
        directory = tmp_path / f"n{n}"
        directory.mkdir()
        dry = snakemake(directory, placeholder_cohort(directory, n), "-n")
        assert dry.returncode == 0, dry.stderr[-3000:]
        counts[n] = inputs_per_job(dry.stdout + dry.stderr)
    assert (counts[3]["ingest"], counts[3]["lung"], counts[3]["register"], counts[3]["patches"]) == (1, 1, 2, 4)
    assert counts[3].keys() == counts[6].keys()
    growing = {rule: (counts[3][rule], counts[6][rule]) for rule in counts[3] if counts[3][rule] != counts[6][rule]}
    assert growing == {"stage_table": (4, 7), "atlas": (6, 12)}, growing


def resources_of(dry_run_output: str) -> dict[str, dict[str, str]]:
    """Rule name -> resources (name -> value) of its last job in a dry run's job listing."""
    return {rule: dict(item.split("=", 1) for item in items) for rule, items in job_fields(dry_run_output, "resources")}


def test_slurm_profile_dry_run(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="the optional [slurm] extra is not installed")
    config = placeholder_cohort(tmp_path)
    dry = snakemake(tmp_path, config, "-n", "--profile", str(ROOT / "profiles" / "slurm"))
    assert dry.returncode == 0, dry.stderr[-3000:]
    output = dry.stdout + dry.stderr
    assert jobs_of(output)["ingest"] == 3
    resources = resources_of(output)
    for rule in ("train", "embed"):
        assert (resources[rule]["gpu"], resources[rule]["slurm_partition"]) == ("1", "gpu"), resources[rule]
    for rule in ("ingest", "lung", "register", "patches"):
        assert "gpu" not in resources[rule] and resources[rule]["runtime"] == "30", resources[rule]
        assert resources[rule]["disk_mb"] == "10000", "disk_mb must be a constant, not sized from the inputs"


@pytest.mark.parametrize("gpus, launcher", [
    (1, "copdssl train --run moco"),
    (4, "torchrun --standalone --nproc_per_node 4 -m pipeline -- train --run moco"),
])
def test_train_launches_torchrun_with_several_gpus(tmp_path, gpus, launcher):
    config = placeholder_cohort(tmp_path)
    target = str(Layout(tmp_path / "work").encoder("moco").relative_to(tmp_path))
    dry = snakemake(tmp_path, config, "-n", target, "-p", "--set-resources", f"train:gpu={gpus}")
    assert dry.returncode == 0, dry.stderr[-3000:]
    train_lines = [line for line in (dry.stdout + dry.stderr).splitlines() if " train --run moco" in line]
    assert train_lines and launcher in train_lines[0], train_lines


class _Tables(HTMLParser):
    """Collects the text of every table cell."""

    def __init__(self):
        super().__init__()
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole workflow on a tiny synthetic cohort (synthetic source, the default path)."""
    directory = tmp_path_factory.mktemp("tiny")
    config = write_config(directory, TINY)
    result = snakemake(directory, config, "--cores", "2")
    assert result.returncode == 0, result.stderr[-5000:]
    return directory, config


def test_end_to_end_report(tiny_run):
    directory, _ = tiny_run
    qc = read_tsv(directory / "results" / "qc.tsv")
    assert len(qc) == TINY["synthetic"]["n_subjects"]
    kept = ("ok", "flagged")  # flagged subjects are kept
    assert all(row["status"] in kept for row in qc), [(r["sid"], r["reason"]) for r in qc if r["status"] not in kept]

    html = (directory / "results" / "report.html").read_text()
    parser = _Tables()
    parser.feed(html)
    cells = " | ".join(parser.cells)
    for row in ("densitometry", "random_init", "moco", "ifm_e0.5", "oracle"):
        assert row in cells, row
    for column in ("logFEV1pp", "logFEV1FVC", "CLE", "Paraseptal", "mMRC"):
        assert column in cells, column
    assert "±" in cells
    for figure in ("training_curves", "patch_grid", "scatter_logFEV1pp", "confusion_CLE", "readout", "locmap_moco"):
        assert (directory / "results" / "figures" / f"{figure}.png").stat().st_size > 1000

    # the per-location read-out map of the run in report.location_map_runs, and no other
    assert "<h2>Where the signal is</h2>" in html and "no location map found" not in html
    location_map = read_tsv(directory / "results" / "moco" / "location_map.tsv")
    assert list(location_map[0]) == ["location", "target", "r2", "n"]
    assert {row["target"] for row in location_map} == {"cle", "pse", "awt"}
    assert {row["n"] for row in location_map} == {str(len(qc))}
    for run in ("random_init", "ifm_e0.5"):
        assert not (directory / "results" / run / "location_map.tsv").exists()

    metrics = read_tsv(directory / "results" / "ifm_e0.5" / "gnn" / "metrics.tsv")
    assert {m["outcome"] for m in metrics} == set(["logFEV1pp", "logFEV1FVC", "CLE", "Paraseptal", "mMRC"])

    # the hand-crafted baselines and "densitometry + run" (every run x pooling) are evaluated and reported
    for row in ("patch statistics", "hand-crafted airway / high-attenuation", "densitometry + ifm_e0.5"):
        assert row in cells, row
    assert 'class="gain"' in html
    for name, pooling in (("patchstats", "patches"), ("airway", "lung"), ("densitometry+random_init", "mean"),
                          ("densitometry+moco", "gnn"), ("densitometry+ifm_e0.5", "mean"),
                          ("densitometry+ifm_e0.5", "gnn")):
        metrics = read_tsv(directory / "results" / name / pooling / "metrics.tsv")
        assert {m["outcome"] for m in metrics} == {"logFEV1pp", "logFEV1FVC", "CLE", "Paraseptal", "mMRC"}, name
    airway = read_tsv(directory / "work" / "baselines" / "airway.tsv")
    assert len(airway) == len(qc) and {"laa950", "haa700", "perc99", "eroded_mean_hu"} <= set(airway[0])
    patchstats = read_tsv(directory / "work" / "baselines" / "patchstats.tsv")
    assert len(patchstats) == len(qc) and "patch_sd_hu" in patchstats[0]

    def subjects_per_outcome(name):  # the join keeps every subject: the same n as the run alone
        rows = read_tsv(directory / "results" / name / "gnn" / "metrics.tsv")
        return {(m["outcome"], m["repeat"], m["n"]) for m in rows}

    assert subjects_per_outcome("densitometry+ifm_e0.5") == subjects_per_outcome("ifm_e0.5")

    embedding = directory / "work" / "runs" / "moco" / "embeddings" / f"{qc[0]['sid']}.npy"
    assert embedding.stat().st_size > 0


def test_rerun_is_a_no_op_and_forcerun_is_targeted(tiny_run):
    directory, config = tiny_run
    again = snakemake(directory, config, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    forced = snakemake(directory, config, "-n", "--forcerun", "report")
    assert jobs_of(forced.stdout + forced.stderr) == {"report": 1, "all": 1}


def test_snakemake_report_packages_the_figures(tiny_run):
    directory, config = tiny_run
    result = snakemake(directory, config, "--report", "snakemake_report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    for name in ("training_curves.png", "patch_grid.png", "confusion_CLE.png", "readout.png", "locmap_moco.png",
                 "qc.tsv"):
        assert f"Adding {name}" in log, name
    assert (directory / "snakemake_report.html").stat().st_size > 100_000


def test_bad_subjects_are_isolated(tiny_run, tmp_path):
    """Manifest source: a corrupt file, a non-CT series, a duplicate and an unsafe ID go to the QC
    table with their reasons; the other subjects are trained on and pooled as usual."""
    source, _ = tiny_run
    images = source / "data" / "synthetic" / "images"
    good = sorted(p for p in images.iterdir() if p.name.endswith(".nii.gz"))[:6]
    data = tmp_path / "data"
    data.mkdir()
    rows = ["sid\timage\tformat"]
    for path in good:
        shutil.copy(path, data / path.name)
        rows.append(f"{path.name[:-7]}\t{path.name}\tnifti")
    truncated = data / "TRUNC.nii.gz"
    truncated.write_bytes(good[0].read_bytes()[:2000])
    rows.append("TRUNC\tTRUNC.nii.gz\tnifti")
    rows.append(f"{good[1].name[:-7]}\t{good[1].name}\tnifti")  # duplicate ID
    rows.append("../escape\tx.nii.gz\tnifti")
    (data / "manifest.tsv").write_text("\n".join(rows) + "\n")
    shutil.copy(source / "data" / "synthetic" / "phenotypes.tsv", data / "phenotypes.tsv")
    raw_before = {p.name: p.read_bytes() for p in data.iterdir()}

    config = {k: v for k, v in TINY.items() if k != "synthetic"}
    config["cohort"] = {"source": "manifest", "manifest": str(data / "manifest.tsv"),
                        "phenotypes": str(data / "phenotypes.tsv")}
    config["evaluate"] = {**TINY["evaluate"], "baselines": ["densitometry"]}
    config_path = write_config(tmp_path, config)
    result = snakemake(tmp_path, config_path, "--cores", "2", "results/qc.tsv", "work/runs/moco/features_mean.tsv")
    assert result.returncode == 0, result.stderr[-5000:]

    qc = {row["sid"]: row for row in read_tsv(tmp_path / "results" / "qc.tsv")}
    assert qc["TRUNC"]["status"] == "failed" and qc["TRUNC"]["failed_stage"] == "ingest"
    assert "truncated or corrupt" in qc["TRUNC"]["reason"]
    # Each later stage found the failure through its upstream status (passed as a path pattern).
    for stage in ("lung", "register", "patches"):
        status = json.loads((tmp_path / "work" / "qc" / stage / "TRUNC.json").read_text())
        assert (status["status"], status["failed_stage"]) == ("skipped", "ingest"), (stage, status)
    duplicate = good[1].name[:-7]
    assert qc[duplicate]["status"] == "rejected" and "duplicate" in qc[duplicate]["reason"]
    assert qc["../escape"]["status"] == "rejected" and "unsafe" in qc["../escape"]["reason"]
    ok = sorted(sid for sid, row in qc.items() if row["status"] in ("ok", "flagged"))
    assert ok == sorted(p.name[:-7] for p in good if p != good[1])

    features = read_tsv(tmp_path / "work" / "runs" / "moco" / "features_mean.tsv")
    assert sorted(row["sid"] for row in features) == ok
    assert {p.name: p.read_bytes() for p in data.iterdir()} == raw_before, "raw inputs were modified"


def test_fixing_a_subject_outside_the_atlas_sample_reruns_only_it_and_the_cohort_stages(tiny_run):
    """The atlas depends on its hashed sample only: a changed raw image of another subject reruns
    that subject's preprocessing and the cohort-level stages, not the atlas or other subjects.
    (Snakemake ≥ 9.18 compares input checksums, so the file is rewritten, not just touched.)"""
    import gzip

    from pipeline.template import atlas_sample

    directory, config = tiny_run
    sids = sorted(p.name.split(".")[0] for p in (directory / "work" / "qc" / "ingest").glob("*.json"))
    sample = atlas_sample(sids, TINY["atlas"]["build_subjects"])
    images = directory / "data" / "synthetic" / "images"
    outside = next(sid for sid in sids if sid not in sample and (images / f"{sid}.nii.gz").is_file())
    image = images / f"{outside}.nii.gz"
    before, original = image.stat(), image.read_bytes()
    try:
        image.write_bytes(gzip.compress(gzip.decompress(original), mtime=1))  # same voxels, new file
        dry = snakemake(directory, config, "-n")
        assert dry.returncode == 0, dry.stderr[-3000:]
        listing = dry.stdout + dry.stderr
        jobs = jobs_of(listing)
        assert jobs, listing[-3000:]
        per_subject = {"ingest", "lung", "register", "patches"}
        assert {rule: jobs[rule] for rule in per_subject} == dict.fromkeys(per_subject, 1), jobs
        wildcards = [line.strip() for line in listing.splitlines() if line.strip().startswith("wildcards:")]
        assert {sid for line in wildcards for sid in re.findall(r"sid=([^,\s]+)", line)} == {outside}
        assert "atlas" not in jobs and "cohort" not in jobs
        assert {"train", "embed", "pool", "evaluate", "report"} <= set(jobs)
    finally:
        image.write_bytes(original)
        os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))


def copdssl(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "copdssl"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_run, tmp_path_factory):
    """The tiny run's `moco` run exported as a bundle (with its graph encoder)."""
    directory, config = tiny_run
    out = tmp_path_factory.mktemp("bundle") / "moco"
    result = copdssl(directory, "export", "--config", str(config), "--run", "moco", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_export_writes_a_self_describing_bundle(tiny_bundle):
    import hashlib

    from safetensors.torch import load_file

    files = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()}
    assert files == {"encoder.safetensors", "graph.safetensors", "atlas/atlas_lung.nii.gz", "atlas/grid.npz",
                     "preprocessing.json", "config.yaml", "provenance.json", "README.md"}
    spec = json.loads((tiny_bundle / "preprocessing.json").read_text())
    assert spec["run"] == "moco" and spec["patch_size"] == TINY["atlas"]["patch_size"]
    assert spec["spacing_mm"] == TINY["ingest"]["spacing_mm"] and spec["input"]["windows"]
    assert load_file(str(tiny_bundle / "encoder.safetensors"))  # plain tensors, no pickle
    provenance = json.loads((tiny_bundle / "provenance.json").read_text())
    for name, digest in provenance["files_sha256"].items():
        assert hashlib.sha256((tiny_bundle / name).read_bytes()).hexdigest() == digest, name
    card = (tiny_bundle / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "copdssl" and front["training_data"]["subjects"] == TINY["synthetic"]["n_subjects"]
    assert "| mean | logFEV1pp | r2 |" in card and "Intended use and limitations" in card


def test_export_accepts_a_run_trained_before_a_schema_default_was_added(tiny_run, tmp_path):
    """A checkpoint whose saved settings lack a key the schema gained later (here encoder.multiscale,
    whose default is the old behaviour) still exports: the defaults are filled in before comparing."""
    import torch

    directory, config = tiny_run
    path = directory / "work" / "runs" / "moco" / "encoder.pt"
    original, stat = path.read_bytes(), path.stat()
    try:
        saved = torch.load(path, weights_only=True)
        del saved["settings"]["encoder"]["multiscale"]
        torch.save(saved, path)
        result = copdssl(directory, "export", "--config", str(config), "--run", "moco", "--out", str(tmp_path / "b"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / "b" / "encoder.safetensors").is_file()
    finally:  # the module's other tests share this run: restore the file and its time stamps
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_apply_reproduces_the_pipeline_embeddings_and_embeds_a_new_cohort(tiny_run, tiny_bundle, tmp_path):
    from pipeline.synth.cohort import write_subject
    from pipeline.synth.plan import plan_cohort
    from tests.preprocess_fixtures import synth_settings

    directory, _ = tiny_run
    images = directory / "data" / "synthetic" / "images"
    trained = sorted(p.name[:-7] for p in images.glob("*.nii.gz"))[:2]
    new = plan_cohort(synth_settings(2, seed=8, spacing_mm=None, **{k: v for k, v in TINY["synthetic"].items()
                                                                    if k not in ("n_subjects", "seed")}))
    for plan in new:
        write_subject(plan, tmp_path / "new")
    rows = ["sid\timage\tformat"] + [f"{sid}\t{images / sid}.nii.gz\tnifti" for sid in trained]
    rows += [f"NEW{i}\t{tmp_path / 'new' / plan.image}\t{plan.format}" for i, plan in enumerate(new)]
    rows.append("BAD\tmissing.nii.gz\tnifti")
    (tmp_path / "scans.tsv").write_text("\n".join(rows) + "\n")
    result = copdssl(tmp_path, "apply", "--bundle", str(tiny_bundle), "--manifest", str(tmp_path / "scans.tsv"),
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    import numpy as np

    for sid in trained:  # bit-identical to the workflow's embeddings on CPU
        ours = np.load(tmp_path / "out" / "work" / "runs" / "moco" / "embeddings" / f"{sid}.npy")
        assert np.array_equal(ours, np.load(directory / "work" / "runs" / "moco" / "embeddings" / f"{sid}.npy")), sid
    qc = {row["sid"]: row for row in read_tsv(tmp_path / "out" / "qc.tsv")}
    assert set(qc) == {*trained, "NEW0", "NEW1", "BAD"}
    assert qc["BAD"]["status"] == "failed" and qc["BAD"]["failed_stage"] == "ingest"
    kept = sorted(sid for sid, row in qc.items() if row["status"] in ("ok", "flagged"))
    assert kept == sorted([*trained, "NEW0", "NEW1"])
    for pooling in ("mean", "gnn"):
        features = read_tsv(tmp_path / "out" / f"features_{pooling}.tsv")
        assert sorted(row["sid"] for row in features) == kept
    pooled = {row["sid"]: row for row in read_tsv(directory / "work" / "runs" / "moco" / "features_mean.tsv")}
    ours = {row["sid"]: row for row in read_tsv(tmp_path / "out" / "features_mean.tsv")}
    assert all(ours[sid] == pooled[sid] for sid in trained)


def test_apply_mode_of_the_workflow_reproduces_the_trained_run(tiny_run, tiny_bundle):
    """`snakemake` with apply.bundle (config/apply.yaml): per-subject preprocessing with the bundle's
    settings and atlas, the bundle's weights instead of training, then embed and pool."""
    import numpy as np

    directory, config = tiny_run
    applied = directory / "apply.yaml"
    settings = {**yaml.safe_load(config.read_text()), "apply": {"bundle": str(tiny_bundle)},
                "work_dir": "work_apply", "results_dir": "results_apply"}
    applied.write_text(yaml.safe_dump(settings))
    dry = snakemake(directory, applied, "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = jobs_of(dry.stdout + dry.stderr)
    n = TINY["synthetic"]["n_subjects"]
    assert jobs["ingest"] == jobs["register"] == jobs["patches"] == n and jobs["unbundle"] == 1
    assert not {"train", "train_graph", "evaluate", "report", "cohort"} & set(jobs), jobs
    assert jobs["embed"] == 1 and jobs["pool"] == 2  # the bundle's run only, mean and gnn pooling
    lint = snakemake(directory, applied, "--lint")
    assert "Congratulations, your workflow is in a good condition" in lint.stdout + lint.stderr, lint.stdout[-3000:]
    result = snakemake(directory, applied, "--cores", "2")
    assert result.returncode == 0, result.stderr[-5000:]
    ours, trained = Layout(directory / "work_apply"), Layout(directory / "work")
    for path in sorted((directory / "work" / "runs" / "moco" / "embeddings").glob("*.npy")):
        assert np.array_equal(np.load(ours.embedding("moco", path.stem)), np.load(path)), path.stem
    for pooling in ("mean", "gnn"):
        assert ours.features("moco", pooling).read_text() == trained.features("moco", pooling).read_text(), pooling
    assert len(read_tsv(directory / "results_apply" / "qc.tsv")) == n


@pytest.mark.parametrize("damage, message", [
    ("missing weights", r"encoder\.safetensors does not exist"),
    ("truncated weights", r"encoder\.safetensors is not a readable safetensors file"),
    ("patch size", r"grid\.npz has 8³ patches at \d+ locations, preprocessing\.json says 6³"),
    ("feature size", r"encoder\.safetensors does not fit preprocessing\.json: .* has shape"),
])
def test_bad_bundles_fail_in_one_line(tiny_bundle, tmp_path, damage, message):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    weights = bundle / "encoder.safetensors"
    spec = json.loads((bundle / "preprocessing.json").read_text())
    if damage == "missing weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "patch size":
        spec["patch_size"] = 6
    else:
        spec["encoder"]["feature_dim"] = spec["encoder"]["feature_dim"] * 2
    (bundle / "preprocessing.json").write_text(json.dumps(spec))
    (tmp_path / "scans.tsv").write_text("sid\timage\nS\tS.nii.gz\n")
    result = copdssl(tmp_path, "apply", "--bundle", str(bundle), "--manifest", str(tmp_path / "scans.tsv"),
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
