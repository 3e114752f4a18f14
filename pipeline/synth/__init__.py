"""The synthetic COPDGene-like cohort (``copdssl synth``): a structural chest-CT model with
known latent disease factors. See ``docs/synthetic_cohort.md``.

Modules, cheapest first:

- :mod:`~pipeline.synth.plan`: subject IDs, formats, latent factors, phenotypes, pose and
  geometry parameters (numpy only; imported by the Snakefile at parse time).
- :mod:`~pipeline.synth.geometry`: voxel grids, pose transforms, NIfTI affines, reorientation.
- :mod:`~pipeline.synth.anatomy`: implicit (signed-distance-like) fields of body, lungs, heart.
- :mod:`~pipeline.synth.trees`: airway and vessel trees, paraseptal bullae (body frame, mm).
- :mod:`~pipeline.synth.fields`: correlated random fields, coarse-to-fine upsampling, CT noise.
- :mod:`~pipeline.synth.render`: one subject's HU volume and true lung labels.
- :mod:`~pipeline.synth.nifti`, :mod:`~pipeline.synth.dicom`: atomic writers.
- :mod:`~pipeline.synth.cohort`: tables and whole-cohort generation; :mod:`~pipeline.synth.preview`:
  PNG montage; :mod:`~pipeline.synth.cli`: ``copdssl synth``.

This package never imports torch.
"""
