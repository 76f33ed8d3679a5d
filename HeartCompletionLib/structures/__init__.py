"""Which structures exist and how other numberings and Slicer segments map onto them.

- :mod:`.table`: the structure table (labels, names, colours, SNOMED CT codes, synonyms), data in
  ``structures_default.json``;
- :mod:`.conventions`: other label numberings (MM-WHS, TotalSegmentator, JSON files);
- :mod:`.segment_mapping`: Slicer segment -> structure (terminology first, then names), and
  :mod:`.segment_mapping_cli`, which regenerates the module's ``.term.json``.
"""

from HeartCompletionLib.moved_modules import forward_old_names

__getattr__ = forward_old_names(__name__)
