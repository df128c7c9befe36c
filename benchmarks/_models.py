"""What the benchmark scripts share: the model named on their command line."""
from __future__ import annotations

import yaml
from omegaconf import OmegaConf

from amedlab.models import build_model


def add_model_args(ap, default: str) -> None:
    ap.add_argument("--model", default=default, help="conf/model/<name>.yaml")
    ap.add_argument("--model-opt", action="append", default=[], help="key=value overrides of the model config")
    ap.add_argument("--model-path", default=None, help="a checkpoint for the model config's path")


def model_from_args(args):
    """conf/model/<args.model>.yaml with --model-opt key=value and --model-path applied, in float32."""
    mcfg = OmegaConf.load(f"conf/model/{args.model}.yaml")
    for kv in args.model_opt:
        key, value = kv.split("=", 1)
        OmegaConf.update(mcfg, key, yaml.safe_load(value))
    if args.model_path:
        mcfg.path = args.model_path
    return build_model(mcfg).float()
