"""Loading and validating the factory's configuration (``config/schema.yaml``)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from maisi.core.anatomy import BODY_REGIONS
from maisi.core.checks import ConfigError
from maisi.core.schema import SCHEMA_FILE, load_schema
from maisi.generate.requests import RequestError, config_requests
from maisi.models.weights import resolve_catalog_references
from maisi.sources.cases import resolve_label_map
from maisi.sources.catalog import default_catalog_path, load_catalog
from maisi.train.settings import resolve_scheduler

__all__ = [
    "ConfigError",
    "load_config",
    "read_config_file",
    "check_config_syntax",
    "yaml_error",
    "validate_config",
    "check_schema",
    "check_config",
    "schema_path",
    "key_path",
]


def schema_path() -> Path:
    return SCHEMA_FILE


def key_path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _with_defaults(validator_class):
    """Extend a jsonschema validator so that ``default`` values are filled in while validating.

    This is the recipe of the jsonschema FAQ, which Snakemake's own ``validate`` also uses; it is
    repeated here so that ``maisi`` can validate configs without Snakemake.
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def check_schema(config: Mapping[str, Any], files: Sequence[str | Path] = ()) -> None:
    """The schema's check alone, with a one-line error: the key, the problem and the config file(s).

    Snakemake's own ``validate`` reports the same problem followed by the whole schema and config
    (about 2,000 lines); the workflow calls this first, so that the first and last lines say what is wrong.
    """
    _raise_schema_error(list(_Validator(load_schema()).iter_errors(copy.deepcopy(dict(config)))), files)


def _raise_schema_error(errors: list, files: Sequence[str | Path] = ()) -> None:
    """The most relevant schema error (if any) as a :class:`ConfigError` naming the key (and the file)."""
    if errors:
        errors = sorted(errors, key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
        err = jsonschema.exceptions.best_match(errors)
        where = f" (in {', '.join(map(str, files))})" if files else ""
        raise ConfigError(f"config key '{key_path(err.absolute_path)}': {err.message}{where}")


def validate_config(config: Mapping[str, Any]) -> dict:
    """Validate ``config`` against the schema, fill defaults and run the semantic checks.

    Returns a new dict; raises :class:`ConfigError` naming the key on the first problem.
    """
    cfg = copy.deepcopy(dict(config))
    validator = _Validator(load_schema())
    _raise_schema_error(list(validator.iter_errors(cfg)))  # also fills the defaults into cfg
    check_config(cfg)
    return cfg


def yaml_error(path: str | Path, exc: yaml.YAMLError) -> str:
    """``<file>:<line>:<column>: not valid YAML: <problem>`` (lines and columns from 1, as editors count them),
    followed by where the construct the parser was in began (``while parsing a flow sequence at line 2, column 10``)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"{path}: not valid YAML: {exc}"
    text = f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {exc.problem}"
    context, at = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at line {at.line + 1}, column {at.column + 1})" if at is not None else ")")
    return text


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None


def read_config_file(path: str | Path) -> Any:
    """A YAML config file's content; a syntax error is a :class:`ConfigError` naming the file, line and column."""
    path = Path(path)
    try:
        return yaml.safe_load(_read_text(path))
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error(path, exc)) from None


def check_config_syntax(*paths: str | Path) -> None:
    """Stop on a YAML syntax error in a config file Snakemake is about to read, naming the file, line and column.

    Snakemake reads a config file as JSON, else YAML, and says only 'Config file is not valid JSON or YAML'. The
    workflow calls this on its ``configfile:`` first. Only the syntax is checked (Snakemake builds the values with
    its own loader); a file that is missing or valid JSON is left to Snakemake.
    """
    for path in map(Path, paths):
        if not path.is_file():
            continue
        text = _read_text(path)
        try:
            json.loads(text)
            continue
        except ValueError:
            pass
        try:
            yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_error(path, exc)) from None


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read a YAML config file (plus optional top-level overrides) and validate it."""
    path = Path(path)
    cfg = read_config_file(path) or {}
    if overrides:
        cfg.update(overrides)
    try:
        return validate_config(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


#: The training stages that can start from a parent checkpoint: the ``pretrained`` key that replaces each, and its output.
_FINE_TUNED = {"train_diffusion": ("diffusion", "results/models/diffusion_unet.pt"),
               "train_controlnet": ("controlnet", "results/models/controlnet.pt")}  # fmt: skip


def _check_init_from(cfg: Mapping[str, Any]) -> None:
    """A stage's ``init_from`` must be a file, not the stage's own output, and not beside a ``pretrained`` file that
    replaces the stage (which then does not run)."""
    for stage, (role, output) in _FINE_TUNED.items():
        path = cfg.get(stage, {}).get("init_from")
        if not path:
            continue
        if cfg.get("pretrained", {}).get(role):
            raise ConfigError(f"config key '{stage}.init_from': 'pretrained.{role}' is given too, so {stage} does not run and "
                              f"nothing is fine-tuned; set one of them")  # fmt: skip
        if not Path(path).is_file():
            raise ConfigError(f"config key '{stage}.init_from': checkpoint file {path} does not exist")
        if Path(path).resolve() == Path(output).resolve():
            raise ConfigError(f"config key '{stage}.init_from': {path} is the stage's own output; copy it elsewhere first")


def check_config(cfg: dict) -> None:
    """The checks the schema cannot express: across keys, against the file system, the requests.

    ``cfg`` is a config the schema validated (with its defaults filled); raises :class:`ConfigError` naming the key.
    A released checkpoint named ``catalog:<variant>`` is replaced, in ``cfg``, by its verified file.
    """
    try:
        resolve_catalog_references(cfg)
        resolve_scheduler(cfg["model"]["variant"], cfg["train_diffusion"]["scheduler"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_requests(cfg)
    if cfg["label_fidelity"]["segmenter"] == "totalsegmentator" and not cfg["totalsegmentator"]["weights"]:
        raise ConfigError("config key 'label_fidelity.segmenter': 'totalsegmentator' needs its weights in "
                          "'totalsegmentator.weights' (see the README, 'TotalSegmentator weights')")  # fmt: skip
    db = cfg["generate"]["mask_database"]
    if db["source"] == "nvidia":
        for key in ("nvidia_candidates", "nvidia_masks"):
            if not (db[key] and Path(db[key]).exists()):
                raise ConfigError(f"config key 'generate.mask_database.{key}': mask_database.source 'nvidia' needs NVIDIA's "
                                  f"{'candidate list' if key == 'nvidia_candidates' else 'mask archive or folder'}, got {db[key]!r}")  # fmt: skip
    generated = sorted(n for n, r in config_requests(cfg).items() if r.masks and r.mask_source == "generated")
    for key, path in cfg["generate"]["mask_generation"].items():
        if generated and key != "steps" and not (path and Path(path).is_file()):
            raise ConfigError(f"config key 'generate.mask_generation.{key}': request(s) {', '.join(generated)} generate their masks "
                              f"and need NVIDIA's file here (python -m maisi.models.weights fetch), got {path!r}")  # fmt: skip
    for key, path in cfg.get("pretrained", {}).items():
        if path and not Path(path).is_file():
            raise ConfigError(f"config key 'pretrained.{key}': checkpoint file {path} does not exist")
    _check_init_from(cfg)
    qc = cfg["qc"]
    if qc["reference"] == "nvidia" and not (qc["nvidia_statistics"] and Path(qc["nvidia_statistics"]).is_file()):
        raise ConfigError(f"config key 'qc.nvidia_statistics': qc.reference 'nvidia' needs NVIDIA's statistics file "
                          f"(configs/image_median_statistics_ct.json of the release), got {qc['nvidia_statistics']!r}")  # fmt: skip
    if cfg["fid"]["enabled"] and not cfg["preprocess"]["keep_hu"]:
        raise ConfigError(
            "config key 'fid.enabled': FID reads the real cases in HU; set 'preprocess.keep_hu: true' or 'fid.enabled: false'"
        )
    if cfg["fid"]["enabled"] and "radimagenet_resnet50" in cfg["fid"]["extractors"]:
        weights = cfg["fid"]["weights"]
        if not weights or not Path(weights).is_file():
            raise ConfigError(f"config key 'fid.weights': the radimagenet_resnet50 extractor needs a local weights file (got {weights!r}); "
                              "it is never downloaded")  # fmt: skip
    lo, hi = cfg["preprocess"]["hu_range"]
    if not lo < hi:
        raise ConfigError(f"config key 'preprocess.hu_range': lower bound {lo} is not below upper bound {hi}")
    for name, src in cfg["sources"].items():
        regions = src["regions"]  # the schema fills its defaults
        where = f"sources.{name}.regions"
        if regions["backend"] == "totalsegmentator" and not cfg.get("totalsegmentator", {}).get("weights"):
            raise ConfigError(
                f"config key '{where}.backend': the totalsegmentator backend needs 'totalsegmentator.weights', "
                "a local folder with TotalSegmentator's models (see the README, 'TotalSegmentator weights')"
            )
        if regions["backend"] == "totalsegmentator" and not cfg["preprocess"]["keep_hu"]:
            raise ConfigError(
                f"config key '{where}.backend': the totalsegmentator backend segments the HU images; set 'preprocess.keep_hu: true'"
            )
        if regions["backend"] == "manual" and not ("top" in regions and "bottom" in regions):
            raise ConfigError(f"config key '{where}': the manual backend needs both 'top' and 'bottom'")
        pairs = [(where, regions.get("top"), regions.get("bottom"))]
        pairs += [(f"{where}.overrides.{case}", o["top"], o["bottom"]) for case, o in regions["overrides"].items()]
        for key, top, bottom in pairs:
            if top and bottom and BODY_REGIONS.index(top) > BODY_REGIONS.index(bottom):
                raise ConfigError(f"config key '{key}': top region '{top}' lies below bottom region '{bottom}'")
        for key in src.get("label_map") or {}:
            if not str(key).isdigit():
                raise ConfigError(
                    f"config key 'sources.{name}.label_map.{key}': source label values must be non-negative integers"
                )
        resolve_label_map(src.get("label_map"), f"sources.{name}.label_map")  # every target a MAISI class name or id
        if src["type"] == "dataset":
            _check_catalog_dataset(cfg, name, src)
        if src["type"] == "phantom":
            for key in ("spacing_xy", "spacing_z"):
                if key in src and src[key][0] > src[key][1]:
                    raise ConfigError(f"config key 'sources.{name}.{key}': range {src[key]} is decreasing")
        if src["type"] == "local" and "{case}" not in src["images"]:
            raise ConfigError(f"config key 'sources.{name}.images': pattern must contain '{{case}}'")
        if src["type"] == "local" and src.get("labels") and "{case}" not in src["labels"]:
            raise ConfigError(f"config key 'sources.{name}.labels': pattern must contain '{{case}}'")


def _check_catalog_dataset(cfg: dict, name: str, src: dict) -> None:
    """A dataset source names an entry of the catalog (``catalog``, read here; its own errors name its file)."""
    path = cfg.get("catalog") or default_catalog_path()
    try:
        entries = load_catalog(path)
    except FileNotFoundError:
        raise ConfigError(f"config key 'catalog': catalog file {path} does not exist") from None
    if src["dataset"] not in entries:
        raise ConfigError(
            f"config key 'sources.{name}.dataset': {src['dataset']!r} is not a dataset of the catalog {path}; "
            f"its datasets are: {', '.join(sorted(entries))}"
        )


def _check_requests(cfg: dict) -> None:
    """Impossible generation requests stop the run before any job starts."""
    try:
        config_requests(cfg)
    except RequestError as exc:
        key, _, reason = str(exc).partition(": ")
        raise ConfigError(f"config key '{key}': {reason}") from None


def _merge(base: dict, update: Mapping[str, Any]) -> dict:
    """``update`` over ``base`` as Snakemake merges config files: nested mappings key by key, anything else replaced."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m maisi.config FILE...``: check config files as the workflow would see them, merged in order.

    Snakemake reads ``--configfile`` files before the workflow starts, and a YAML error there gets only 'Config
    file is not valid JSON or YAML'; this names the file, line and column, then validates the merge.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m maisi.config", description=main.__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="config files in Snakemake's order: config/config.yaml, then each --configfile")
    args = parser.parse_args(argv)
    try:
        cfg: dict = {}
        for path in args.files:
            content = read_config_file(path)
            if content is not None and not isinstance(content, Mapping):
                raise ConfigError(f"{path}: a config file holds a mapping of keys at its top level, not a {type(content).__name__}")
            _merge(cfg, content or {})
        try:
            validate_config(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {', '.join(args.files)})") from None
    except (ConfigError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"{', '.join(args.files)}: valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
