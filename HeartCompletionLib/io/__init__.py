"""Label maps in and out: the in-memory label map, where label maps come from, what is written.

- :mod:`.labelmap`: ``LabelMap`` (labels + IJK->RAS), the truncation rule;
- :mod:`.labelmap_files`: label-map files (NIfTI, NRRD, ``.seg.nrrd``, MetaImage) and the file-name
  rules (case names, finding label maps in a folder); :mod:`.metaimage`: the SimpleITK mechanics;
- :mod:`.synthetic`: analytic synthetic hearts rasterised to label maps (tests, the demo, the
  study's population);
- :mod:`.meshes`: surface meshes of label maps (STL/OBJ/PLY/VTK with ``SPACE=RAS``, GLB).

Every file is written through :mod:`HeartCompletionLib.atomic_io` (nothing half-written).
"""
