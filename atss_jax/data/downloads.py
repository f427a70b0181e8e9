"""Downloads that survive a dropped connection or a killed process: COCO's archives fetched with HTTP range
requests into a local folder, where TFDS then finds them as manual downloads (``tfds.download.DownloadConfig
(manual_dir=...)``) and checks their registered checksums before extracting them.

TFDS's own downloader restarts an interrupted file from its first byte; COCO 2017's images are 19 GB (train),
6.6 GB (test) and 0.8 GB (validation), hours on a slow link.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import IO

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from atss_jax import errors
from atss_jax.data import coco

# Bytes read per request chunk, and how often a failed request is retried before giving up.
CHUNK_BYTES = 8 << 20
RETRIES = 20
RETRY_WAIT_S = 10.0

# (url, headers) -> the response (a file-like object with .status and .headers); urllib's in real use.
Opener = Callable[[urllib.request.Request], IO[bytes]]


class DownloadError(errors.Refusal, RuntimeError):
    """A download that cannot complete (the server refuses, or the size is wrong after every retry)."""


def tfds_archives(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
    """url -> size of the archives a TFDS COCO builder (``coco/2017``...) downloads: those of its config's
    splits, looked up in the builder's registered checksums (which also name the file TFDS expects)."""
    names = set()
    for split in builder.builder_config.splits:
        names |= {f"{split.images}.zip", f"{split.annotations}.zip"}
    return {url: int(info.size) for url, info in builder.url_infos.items() if info.filename in names}


def fetch(url: str, folder: epath.PathLike, size: int, opener: Opener | None = None,
          retry_wait_s: float = RETRY_WAIT_S) -> epath.Path:
    """Downloads ``url`` into the local ``folder`` under its own file name, resuming a partial ``<name>.part``
    left by an earlier attempt; the finished file appears under its name only once it has ``size`` bytes.

    Returns the file's path. Raises DownloadError after ``RETRIES`` failed requests in a row.
    """
    opener = opener or (lambda request: urllib.request.urlopen(request, timeout=60))
    folder = epath.Path(folder)
    target = folder / url.rsplit("/", 1)[-1]
    if target.exists() and target.stat().length == size:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{target.name}.part"
    failures = 0
    while True:
        done = partial.stat().length if partial.exists() else 0
        if done == size:
            partial.rename(target)
            return target
        if done > size:
            logging.warning("%s has %d bytes, more than the %d expected: downloading it again.", partial, done, size)
            partial.unlink()
            continue
        try:
            with opener(urllib.request.Request(url, headers={"Range": f"bytes={done}-"})) as response:
                if response.status != 206:  # the server ignored the range: it sends the whole file
                    done = 0
                logging.info("%s: %s from byte %d of %d.", url, "resuming" if done else "downloading", done, size)
                with partial.open("ab" if done else "wb") as out:
                    while chunk := response.read(CHUNK_BYTES):
                        out.write(chunk)
                        failures = 0
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            failures += 1
            if failures > RETRIES:
                raise DownloadError(f"{url}: {failures} failed requests in a row, the last: {error}. Run the same "
                                    f"command again to resume from {partial}.") from None
            logging.warning("%s: %s; retrying in %.0f s (%d/%d).", url, error, retry_wait_s, failures, RETRIES)
            time.sleep(retry_wait_s)


def fetch_all(archives: Mapping[str, int], folder: epath.PathLike, opener: Opener | None = None) -> None:
    """``fetch`` for each url -> size of ``archives``, smallest first (the annotations are ready early)."""
    if not coco.is_local(folder):
        raise errors.ConfigError(f"download dir {folder}: must be a local folder (a partial file is appended to).")
    for url, size in sorted(archives.items(), key=lambda item: item[1]):
        fetch(url, folder, size, opener)
