"""The weight files of a local diffusers / transformers component folder (transformer, VAE, text encoder)."""

from __future__ import annotations

from pathlib import Path

from ..jsonio import read_json


# The single-file names of the official layouts (transformers, diffusers). Beside one of them, other
# *.safetensors files are variants (e.g. `diffusion_pytorch_model.fp16.safetensors`) or adapters.
SINGLE_FILE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


def weight_files(folder: str | Path, *, error: type[Exception] = FileNotFoundError) -> list[Path]:
    """The safetensors weights of `folder`: each shard index (`*.safetensors.index.json`) followed by
    the shards it lists; else the one `*.safetensors` file, or among several the one with an
    official single-file name (:data:`SINGLE_FILE_NAMES`; the others are left alone). Pickle
    `.bin` files are never loaded. Raises `error`, naming the file, when there are no weights,
    several files and no index or official name to choose by, an index is unreadable or lists
    none, or a listed shard is missing. Callers that want the tensors alone keep the paths ending
    in `.safetensors`."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        files: list[Path] = []
        for index in indexes:
            d = read_json(index, "shard index", error=error)
            names = sorted(set((d.get("weight_map") or {}).values())) if isinstance(d, dict) else []
            if not names:
                raise error(f"{index}: the shard index lists no weight files")
            shards = [folder / n for n in names]
            gone = [s.name for s in shards if not s.is_file()]
            if gone:
                raise error(f"{index}: weight shards missing: {', '.join(gone[:4])}")
            files += [index, *shards]
        return files
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        extra = f" (only pickle files {bins[:3]}, which are never loaded)" if bins else ""
        raise error(f"{folder}: no safetensors weights{extra}")
    if len(found) > 1:
        named = [p for p in found if p.name in SINGLE_FILE_NAMES]
        if len(named) != 1:
            raise error(f"{folder}: {len(found)} safetensors files ({', '.join(p.name for p in found[:4])}) and no "
                        f"shard index saying which hold the weights: keep one file, name it "
                        f"{' or '.join(SINGLE_FILE_NAMES)}, or add a *.safetensors.index.json")
        return named
    return found
