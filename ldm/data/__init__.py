"""Medical image data: datasets, NIfTI/2D reading, intensity scaling, the synthetic phantom (docs/data.md).

Example dict of every dataset (default collate batches it):

- ``image`` float32 ``H x W x 1`` in [-1, 1] (``1 x H x W``, channel first, from
  ``ldm.data.monai_data.MonaiSliceDataset``, the MONAI pipeline; models, the segmenter and the evaluation
  take either layout); ``segmentation`` int64 ``H x W``; ``has_segmentation`` bool;
  ``file_path_``, ``relative_file_path_``; ``slice_index`` (-1 for a 2D file);
- geometry (``MedicalImagesBase``): ``spacing`` float32 ``[row, column]`` mm of the returned pixels and
  ``affine`` float32 ``4 x 4``, the voxel-to-world (RAS+ mm) affine of the returned slice stored as a
  one-slice canonical volume ``ldm.data.io.display_slice_to_canonical(image[..., 0], slice_axis)`` (after
  resampling, padding, cropping and flips); NaN for 2D files, which record no geometry.
  ``MedicalImagesBase.slice_geometry(i)`` gives it from the headers alone. Writing
  ``nibabel.Nifti1Image(display_slice_to_canonical(x, axis), affine)`` puts a generated slice in the
  source's orientation and spacing; ``ldm.data.intensity.hu_from_ct`` maps CT values back to HU.

Batches: models take channel-last ``B,H,W,C`` and channel-first ``B,C,H,W`` images
(``ldm.data.batch.to_channels_first``).
"""
