"""Where the metric networks' weights come from: local files only.

clean-fid and lpips download their backbones on first use. On a machine without network
that fails deep inside a metric, after hours of generation; and on a machine with network
it silently fetches files nobody pinned. Here both are looked up before anything runs, in
an explicit order, and a missing file is an error that says which file, where it was
looked for, and how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "I2AM_INCEPTION"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
ALEXNET_ENV = "I2AM_ALEXNET"
CLEANFID_CACHE = Path("/tmp")  # where clean-fid itself downloads the Inception file


class MissingWeightsError(FileNotFoundError):
    """A metric's weight file is not on disk; the message says how to get it."""


def _candidates(flag: str | os.PathLike | None, env: str, filename: str, default_dirs: list[Path]
                ) -> tuple[list[Path], bool]:
    """Paths to try in order, and whether the user named one explicitly (then only that)."""
    explicit = flag if flag is not None else os.environ.get(env) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        return [p / filename if p.is_dir() else p], True
    return [d / filename for d in default_dirs], False


def _missing(what: str, filename: str, url: str, looked: list[Path], flag: str, env: str, place: str) -> MissingWeightsError:
    where = "\n".join(f"  {p}" for p in looked)
    return MissingWeightsError(
        f"{what} weights not found: {filename}\nlooked for:\n{where}\n"
        f"Nothing is downloaded at run time. On a machine with internet: download {url}\n"
        f"then copy it to {place}, or pass {flag} PATH, or set {env}=PATH."
    )


def find_inception(flag: str | os.PathLike | None = None) -> Path:
    """clean-fid's TorchScript Inception (the network behind published clean-fid numbers):
    ``--inception`` (file or folder), else ``$I2AM_INCEPTION``, else clean-fid's own cache
    ``/tmp/inception-2015-12-05.pt`` (where an earlier online clean-fid run put it)."""
    paths, explicit = _candidates(flag, INCEPTION_ENV, INCEPTION_FILE, [CLEANFID_CACHE])
    for p in paths:
        if p.is_file():
            return p
    env_note = f" (from ${INCEPTION_ENV})" if explicit and flag is None else ""
    raise _missing("Inception (FID/KID)" + env_note, INCEPTION_FILE, INCEPTION_URL, paths, "--inception",
                   INCEPTION_ENV, "any folder")


def torch_hub_checkpoints() -> Path:
    """torchvision's weight cache: ``$TORCH_HOME/hub/checkpoints`` (default ~/.cache/torch)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def find_alexnet(flag: str | os.PathLike | None = None) -> Path:
    """torchvision's ImageNet AlexNet (the LPIPS-alex backbone): ``--alexnet`` (file or
    folder), else ``$I2AM_ALEXNET``, else ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``
    (where torchvision caches it)."""
    hub = torch_hub_checkpoints()
    paths, explicit = _candidates(flag, ALEXNET_ENV, ALEXNET_FILE, [hub])
    for p in paths:
        if p.is_file():
            return p
    env_note = f" (from ${ALEXNET_ENV})" if explicit and flag is None else ""
    raise _missing("AlexNet (LPIPS)" + env_note, ALEXNET_FILE, ALEXNET_URL, paths, "--alexnet", ALEXNET_ENV, str(hub))
