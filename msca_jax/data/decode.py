"""How video files become stored frames: the settings a dataset's preparation records.

Its own module, importing nothing of msca_jax.data: the sources read it from a dataset, the
preparation tools (prepare_videos, the Kinetics builder, the synthetic set) write it, and
`predict` decodes a new video with it, without any of them importing another.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How video files were turned into stored frames, recorded when a dataset is prepared.

  `predict` decodes a new video with the settings of the data the model was trained on; the
  preparation tools take their defaults from here, so there is one set of defaults.
  """
  fps: float = 25.0           # the 8x32 recipe's stride assumes 25 fps
  short_side: int = 256
  jpeg_quality: int = 90
  max_frames: int = 0         # 0: every frame
  origin: str = "the preparation defaults"

  def describe(self) -> str:
    side = f"short side {self.short_side}" if self.short_side else "original size"
    text = f"{self.fps:g} fps, {side}, JPEG quality {self.jpeg_quality}"
    if self.max_frames:
      text += f", at most {self.max_frames} frames"
    return f"{text} ({self.origin})" if self.origin else text

  def as_json(self) -> dict:
    return {"fps": self.fps, "short_side": self.short_side, "jpeg_quality": self.jpeg_quality,
            "max_frames": self.max_frames}

  @classmethod
  def from_json(cls, values: dict, origin: str) -> "DecodeSettings":
    return cls(fps=float(values.get("fps", cls.fps)), short_side=int(values["short_side"]),
               jpeg_quality=int(values["jpeg_quality"]),
               max_frames=int(values.get("max_frames", 0)), origin=origin)
