"""moeify.json: the metadata file of a converted model's directory, and its one reader."""
from __future__ import annotations

from pathlib import Path

from moeify.checkpoint.files import read_json
from moeify.checkpoint.records import ModelSummary
from moeify.checkpoint.schemas import MOEIFY_VERSION, validate
from moeify.errors import MoeifyError

MOEIFY_FILE = "moeify.json"
# Weights are moeify-model*.safetensors, not model*.safetensors: with neither config.json nor
# transformers' weight names here, from_pretrained refuses the directory at once instead of loading
# the dense model with every converted FFN initialised at random.
WEIGHTS_STEM = "moeify-model"
# 2: one record per Switch layer (summary.moe_layers); 3: dense_config here, no config.json
FORMAT_VERSION = MOEIFY_VERSION


def read_metadata(path: str | Path) -> dict:
    """moeify.json of an output directory, validated."""
    path = Path(path)
    if not path.exists():
        raise MoeifyError(f"{path} does not exist: convert a model first with `moeify convert ... -o {path}`")
    if not (path / MOEIFY_FILE).is_file():
        raise MoeifyError(f"{path} is not a moeify output (no {MOEIFY_FILE}): convert it with `moeify convert`")
    return validate(MOEIFY_FILE, read_json(path / MOEIFY_FILE, fix="re-run `moeify convert`"), path / MOEIFY_FILE)


def require_weights(path: str | Path, meta: dict, what: str) -> None:
    """Refuse a structure-only directory (converted on the meta device) for `what` ("exporting it"), which needs
    the weights."""
    if not meta["weights"]:
        raise MoeifyError(f"{path} is structure only (converted with --device meta): {what} needs its weights; "
                          "convert the model again without --device meta")


def saved_summary(meta: dict) -> ModelSummary:
    """The ModelSummary a moeify.json holds (read_metadata checked its every field)."""
    return ModelSummary.from_dict(meta["summary"])
