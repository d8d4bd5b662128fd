"""moeify.json: the metadata file of a converted model's directory, and its one reader."""
from __future__ import annotations

from pathlib import Path

from moeify.checkpoint.files import read_json
from moeify.checkpoint.records import ModelSummary
from moeify.errors import MoeifyError

MOEIFY_FILE = "moeify.json"
# Weights are moeify-model*.safetensors, not model*.safetensors: with neither config.json nor
# transformers' weight names here, from_pretrained refuses the directory at once instead of loading
# the dense model with every converted FFN initialised at random.
WEIGHTS_STEM = "moeify-model"
FORMAT_VERSION = 3  # 2: one record per Switch layer (summary.moe_layers); 3: dense_config here, no config.json


def read_metadata(path: str | Path) -> dict:
    """moeify.json of an output directory, validated."""
    path = Path(path)
    if not path.exists():
        raise MoeifyError(f"{path} does not exist: convert a model first with `moeify convert ... -o {path}`")
    if not (path / MOEIFY_FILE).is_file():
        raise MoeifyError(f"{path} is not a moeify output (no {MOEIFY_FILE}): convert it with `moeify convert`")
    meta = read_json(path / MOEIFY_FILE, fix="re-run `moeify convert`")
    if meta.get("format") != "moeify":
        raise MoeifyError(f"{path / MOEIFY_FILE} is not a moeify manifest: re-run `moeify convert`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MoeifyError(f"{path} has format version {meta.get('format_version')}, this moeify reads "
                          f"{FORMAT_VERSION}: convert the model again with this version")
    return meta


def saved_summary(meta: dict) -> ModelSummary:
    """The ModelSummary a moeify.json holds."""
    try:
        return ModelSummary.from_dict(meta["summary"])
    except (KeyError, TypeError, AttributeError) as e:
        raise MoeifyError(f"moeify.json's summary is incomplete ({e}): convert the model again") from None
