"""Progress bars for long work; every caller exposes a switch to turn them off."""
from __future__ import annotations

import os
from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str = "", total: Optional[int] = None, disable: bool = False) -> Iterable[T]:
  """``tqdm`` over ``iterable`` unless ``disable`` or ``$JAXPRUNE_NO_PROGRESS`` is set."""
  if disable or os.environ.get("JAXPRUNE_NO_PROGRESS"):
    return iterable
  from tqdm.auto import tqdm
  return tqdm(iterable, desc=desc, total=total, leave=False)
