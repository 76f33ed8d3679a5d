"""Physical space: coordinates, surfaces, distances and measures, all in RAS millimetres.

- :mod:`.affine`: IJK -> RAS matrices, LPS <-> RAS;
- :mod:`.normalization`: the rule between millimetres and network units;
- :mod:`.surface`: surface extraction and area-uniform sampling; :mod:`.signed_distance`: signed
  distances in mm;
- :mod:`.metrics`: Dice, HD95, ASSD, volume error.

Nothing here reads files or knows the structure table: masks and ``ijk_to_ras`` in, millimetres out.
"""

from HeartCompletionLib.moved_modules import forward_old_names

__getattr__ = forward_old_names(__name__)
