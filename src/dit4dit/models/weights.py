"""The weight files of a local diffusers / transformers component folder (transformer, VAE, text encoder)."""

from __future__ import annotations

from pathlib import Path

from ..jsonio import read_json


def weight_files(folder: str | Path, *, error: type[Exception] = FileNotFoundError) -> list[Path]:
    """The safetensors weights of `folder`: each shard index (`*.safetensors.index.json`) followed by
    the shards it lists, else every `*.safetensors` file (sorted). Pickle `.bin` files are never
    loaded. Raises `error`, naming the file, when there are no weights, an index is unreadable or
    lists none, or a listed shard is missing. Callers that want the tensors alone keep the paths
    ending in `.safetensors`."""
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
    return found
