"""Why a video was skipped: the codes every source and the pipeline share.

A record that cannot be used never stops a run and never reaches the model: training drops it and
counts it by reason in the stream state (saved with checkpoints), evaluation keeps it in its batch
with mask 0 and its code, so that every video of a split is accounted for exactly once.
"""

from __future__ import annotations


class DataError(ValueError):
  """Bad data or a bad data configuration; the message names the file or field."""


# Error codes: 0 is a good record, i + 1 is SKIP_REASONS[i]. Append only: the codes are saved.
SKIP_REASONS = ("corrupt_shard", "undecodable", "label_out_of_range", "no_frames",
                "missing_frames", "frame_count_mismatch")
CORRUPT, UNDECODABLE, LABEL, NO_FRAMES, MISSING_FRAMES, FRAME_COUNT = range(1, len(SKIP_REASONS) + 1)
