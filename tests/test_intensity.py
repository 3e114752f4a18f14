"""PatchInput: lung masking, clipping to the windows' range, working units, window channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.intensity import HU_PER_UNIT, PatchInput


def _patch():
    hu = torch.tensor([-1024, -990, -860, -700, -300, 40, 240, 1500], dtype=torch.int16)
    return hu.view(1, 2, 2, 2)


def test_reference_window_is_the_old_normalisation():
    hu = _patch()
    x = PatchInput()(hu)
    assert x.shape == (1, 1, 2, 2, 2) and x.dtype == torch.float32
    expected = (hu.clamp(-1024, 240).float() + 1024.0) / 632.0 - 1.0
    torch.testing.assert_close(x[:, 0], expected)


def test_two_windows_are_two_channels_clipped_and_scaled():
    spec = PatchInput(windows=((-1024, -700), (-1024, 240)))
    x = spec(_patch())
    assert x.shape == (1, 2, 2, 2, 2) and spec.channels == 2
    values = _patch().flatten().float()
    lung = 2 * (values.clamp(-1024, -700) + 1024) / 324 - 1
    wide = 2 * (values.clamp(-1024, 240) + 1024) / 1264 - 1
    torch.testing.assert_close(x[0, 0].flatten(), lung)
    torch.testing.assert_close(x[0, 1].flatten(), wide)
    assert x.min() >= -1 and x.max() <= 1


def test_working_units_clip_to_the_union_of_the_windows():
    spec = PatchInput(windows=((-1000, -700), (-200, 200)))
    assert spec.hu_range == (-1000, 200)
    x = spec.working_units(_patch())
    assert x.shape == (1, 1, 2, 2, 2)
    torch.testing.assert_close(x.flatten() * HU_PER_UNIT, _patch().flatten().float().clamp(-1000, 200))
    assert spec.pad_value == pytest.approx(-1.0)


def test_lung_mask_fills_non_lung_voxels_and_keeps_lung_voxels():
    spec = PatchInput(windows=((-1024, 240),), lung_mask=True, fill_hu=-850)
    hu = _patch()
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool).view(1, 2, 2, 2)
    x = spec.working_units(hu, mask)[:, 0] * HU_PER_UNIT
    torch.testing.assert_close(x[mask], hu[mask].float().clamp(-1024, 240))  # lung voxels unchanged
    torch.testing.assert_close(x[~mask], torch.full((int((~mask).sum()),), -850.0))  # non-lung: the fill
    # a patch of lung voxels only is the same with or without masking
    full = torch.ones_like(mask)
    torch.testing.assert_close(spec(hu, full), PatchInput()(hu))


def test_lung_mask_without_masks_or_bad_windows_is_an_error():
    with pytest.raises(ValueError, match="no lung masks"):
        PatchInput(lung_mask=True).working_units(_patch())
    with pytest.raises(ValueError, match="do not match"):
        PatchInput(lung_mask=True).working_units(_patch(), torch.ones(1, 2, 2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="low < high"):
        PatchInput(windows=((-700, -1024),))
    with pytest.raises(ValueError, match="at least one"):
        PatchInput(windows=())


def test_from_settings_reads_the_input_section():
    from pipeline.config import run_settings, validate_config

    config = validate_config({"runs": {"r": {"input": {"windows": [[-1024, -700], [-1024, 240]], "lung_mask": True}}}})
    spec = PatchInput.from_settings(run_settings(config, "r")["input"])
    assert spec.windows == ((-1024.0, -700.0), (-1024.0, 240.0)) and spec.lung_mask and spec.fill_hu == -850.0


def test_packed_masks_round_trip():
    from pipeline.patches import pack_masks, unpack_masks

    masks = np.random.default_rng(0).random((3, 5, 5, 5)) < 0.5
    packed = pack_masks(masks)
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, 5, 1)
    np.testing.assert_array_equal(unpack_masks(packed, 5), masks)
