"""Validate the workflow configuration against its schema and fill in the defaults.

The Snakefile calls :func:`checked_config` at start-up, so a bad value stops the run before any
job, with one line per problem naming the key (``reserve_configs.presized.NSA_SEL_PACK_RESERVE_N``),
the value and what is accepted. Usable on its own: ``python config_check.py config.yaml mine.yaml``
checks the files as ``snakemake --configfile mine.yaml`` would merge them, and names the file and
line of malformed YAML (Snakemake reads ``--configfile`` files before any code of the workflow runs
and names neither).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jsonschema
import yaml

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The configuration holds values the workflow does not accept."""


def load_yaml(path) -> dict:
    """A YAML mapping from ``path``; malformed YAML is a ConfigError naming the file and line."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_schema(path=SCHEMA) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _resolve(schema: dict, node: dict) -> dict:
    """Follow a local ``$ref`` (merging sibling keywords over the target)."""
    while isinstance(node, dict) and "$ref" in node:
        target = schema
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def fill_defaults(schema: dict, node: dict, value):
    """``value`` with every missing property that has a ``default`` filled in, recursively.

    Mapping defaults replace a missing mapping whole; a given mapping is kept as the user wrote
    it (listing one variant must not add the default variants), except where the schema says
    ``x-merge-default`` (the acceptance thresholds: setting one keeps the others).
    """
    node = _resolve(schema, node)
    if not isinstance(value, dict):
        return value
    out = dict(value)
    for key, sub in (node.get("properties") or {}).items():
        sub = _resolve(schema, sub)
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        elif key in out and sub.get("x-merge-default") and isinstance(out[key], dict) \
                and isinstance(sub.get("default"), dict):
            out[key] = _deep_merge(sub["default"], out[key])
        if key in out:
            out[key] = fill_defaults(schema, sub, out[key])
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _allowed_keys(schema: dict, node: dict) -> list[str]:
    """Property names a mapping may hold under ``node`` (its own and those of its ``allOf`` parts)."""
    node = _resolve(schema, node)
    keys = list((node.get("properties") or {}).keys())
    for part in node.get("allOf") or []:
        keys += [k for k in _allowed_keys(schema, part) if k not in keys]
    return keys


def describe_error(err: jsonschema.ValidationError, schema: dict | None = None) -> str:
    """One line: the config key, the offending value, and what the schema accepts."""
    path = list(err.absolute_path)
    if err.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(err.instance, dict):
        allowed = _allowed_keys(schema or {}, err.schema)
        extra = [k for k in err.instance if k not in allowed]
        if allowed and extra:
            return (f"unknown config key {', '.join(_key(path + [k]) for k in extra)}; "
                    f"accepted keys here: {', '.join(sorted(allowed))}")
    if "propertyNames" in err.schema_path:
        accepted = err.schema.get("description", err.message) if isinstance(err.schema, dict) else err.message
        return f"config key {_key(path)}: the name {err.instance!r} is not accepted; accepted: {accepted}"
    accepted = err.schema.get("description") if isinstance(err.schema, dict) else None
    if err.validator == "enum":
        accepted = "one of " + ", ".join(map(str, err.validator_value))
    value = err.instance
    shown = repr(value) if len(repr(value)) < 80 else type(value).__name__
    if err.validator in ("oneOf", "anyOf") and accepted:  # jsonschema's own words name no alternative
        return f"config key {_key(path)} = {shown} is invalid; accepted: {accepted}"
    return f"config key {_key(path)} = {shown} is invalid: {err.message}" + (f"; accepted: {accepted}" if accepted else "")


def check_semantics(cfg: dict) -> list[str]:
    """Rules the schema cannot say: cross-references between keys."""
    problems = []
    if cfg.get("baseline") not in (cfg.get("variants") or {}):
        problems.append(f"config key baseline = {cfg.get('baseline')!r} is not a variant; accepted: one of "
                        + ", ".join(repr(v) for v in cfg.get("variants") or {}))
    cpu_modes = (cfg.get("decode") or {}).get("cpu", {}).get("modes") or []
    if any(m != "eager" for m in cpu_modes):
        problems.append(f"config key decode.cpu.modes = {cpu_modes} is invalid: CUDA graphs need a GPU; accepted: [eager]")
    for device, sizes in (cfg.get("consistency") or {}).items():
        if device in ("cpu", "cuda") and isinstance(sizes, dict) and sizes.get("prefix", 0) >= sizes.get("seq_len", 1):
            problems.append(f"config key consistency.{device}.prefix = {sizes.get('prefix')} must be below "
                            f"consistency.{device}.seq_len = {sizes.get('seq_len')} (no decode step would be checked)")
    for device, sizes in (cfg.get("train") or {}).items():
        if isinstance(sizes, dict) and sizes.get("warmup", 0) >= sizes.get("steps", 1):
            problems.append(f"config key train.{device}.warmup = {sizes.get('warmup')} must be below "
                            f"train.{device}.steps = {sizes.get('steps')} (no step would be timed)")
    for device, sizes in (cfg.get("equivalence") or {}).items():
        if isinstance(sizes, dict) and sizes.get("decode_steps", 0) >= sizes.get("seq_len", 1):
            problems.append(f"config key equivalence.{device}.decode_steps = {sizes.get('decode_steps')} must be "
                            f"below equivalence.{device}.seq_len = {sizes.get('seq_len')}")
    model = cfg.get("model") or {}
    problems += selection_blind_spots(cfg)
    if model.get("block_stride", 1) > model.get("block_len", 1) or model.get("block_len", 0) % model.get("block_stride", 1):
        problems.append(f"config key model.block_stride = {model.get('block_stride')} must divide "
                        f"model.block_len = {model.get('block_len')}")
    return problems


FORCED_BLOCKS = 3


def selection_blind_spots(cfg: dict) -> list[str]:
    """Output checks at lengths where every block is selected cannot see the selection (a commit
    that flips the sign of the selection scores would pass): each compared length must hold more
    selection blocks than ``n_sel``."""
    model = cfg.get("model") or {}
    block, n_sel = model.get("sel_block_len"), model.get("n_sel")
    if not (isinstance(block, int) and isinstance(n_sel, int) and block > 0):
        return []
    out = []
    if n_sel <= FORCED_BLOCKS:
        # The first block and the two most recent ones are always selected (the paper, §3.3.2):
        # with no slot left for the scores, no output check can see them.
        out.append(f"config key model.n_sel = {n_sel} leaves no block for the selection scores to choose "
                   f"(the first and the two most recent blocks are always selected); accepted: >= {FORCED_BLOCKS + 1}")
    need = n_sel * block + 1
    for stage in ("equivalence", "consistency"):
        for device, sizes in (cfg.get(stage) or {}).items():
            if device in ("cpu", "cuda") and isinstance(sizes, dict) and isinstance(sizes.get("seq_len"), int) \
                    and sizes["seq_len"] < need:
                out.append(f"config key {stage}.{device}.seq_len = {sizes['seq_len']} is too short to see the selection: "
                           f"with model.sel_block_len = {block} and model.n_sel = {n_sel} every block is selected; "
                           f"accepted: >= {need}")
    return out


def normalized_suites(suites: dict, test_dir: str) -> dict:
    """Every suite as ``{args, env, min_tests}`` (a bare marker string means ``[test_dir, -m, marker]``)."""
    out = {}
    for name, suite in suites.items():
        if isinstance(suite, str):
            suite = {"args": [test_dir, "-m", suite]}
        out[name] = {"args": list(suite["args"]), "env": dict(suite.get("env", {})),
                     "min_tests": suite.get("min_tests", 1)}
    return out


# Mappings that a --configfile replaces whole instead of merging into config.yaml's: a run about
# another repository must not inherit this one's variants, suites or reserve configurations.
REPLACED_KEYS = ("variants", "suites", "reserve_configs", "common_env")


def replace_mappings(config: dict, configfiles, cli_config: dict | None = None) -> dict:
    """``config`` (as Snakemake merged it) with each REPLACED_KEYS mapping taken whole from the last
    of ``configfiles`` (then ``--config``) that defines it."""
    out = dict(config)
    for path in configfiles or []:
        data = load_yaml(path)
        for key in REPLACED_KEYS:
            if key in data:
                out[key] = data[key]
    for key in REPLACED_KEYS:
        if cli_config and key in cli_config:
            out[key] = cli_config[key]
    return out


def load_merged(paths) -> dict:
    """The files merged as ``snakemake --configfile`` merges them over config.yaml: later files win,
    mappings merge, except REPLACED_KEYS, which a later file that defines one replaces whole."""
    merged = {}
    for path in paths:
        merged = _deep_merge(merged, load_yaml(path))
    return replace_mappings(merged, list(paths)[1:])


def implementation_problems(cfg: dict, base=None) -> tuple[list[str], dict]:
    """Load the adapter (no torch needed) and let it check every variable the config sets.
    Returns (problems, the resolved implementation: adapter file, install mode, capabilities)."""
    import adapter_api

    impl = cfg.get("implementation") or {}
    try:
        path = adapter_api.adapter_path(impl.get("adapter", "nsa"), base)
        module = adapter_api.load(path)
    except (adapter_api.AdapterError, ImportError, SyntaxError) as e:
        return [str(e)], {}
    problems = []
    sources = [("common_env", cfg.get("common_env") or {})]
    sources += [(f"reserve_configs.{n}", v or {}) for n, v in (cfg.get("reserve_configs") or {}).items()]
    sources += [(f"suites.{n}.env", s.get("env") or {}) for n, s in (cfg.get("suites") or {}).items()
                if isinstance(s, dict)]
    for key, variables in sources:
        problems += [f"config key {key}: {p}" for p in adapter_api.check_env(module, variables)]
    resolved = {"adapter": impl.get("adapter", "nsa"), "adapter_file": str(path),
                "name": getattr(module, "NAME", path.stem), "install": impl.get("install") or getattr(module, "INSTALL", "pip"),
                "extra_requirements": list(getattr(module, "EXTRA_REQUIREMENTS", [])) + list(impl.get("extra_requirements", [])),
                "capabilities": adapter_api.capabilities(module)}
    return problems, resolved


def checked_config(cfg: dict, schema_path=SCHEMA) -> dict:
    """The configuration with defaults filled in; raises ConfigError listing every problem."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"the configuration must be a mapping of keys, got {type(cfg).__name__}")
    schema = load_schema(schema_path)
    full = fill_defaults(schema, schema, cfg)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(full), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    problems = [describe_error(e, schema) for e in errors]
    if not problems:
        problems = check_semantics(full)
    if not problems:
        problems += implementation_problems(full, Path.cwd())[0]
    if problems:
        seen = list(dict.fromkeys(problems))
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(seen))
    return full


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="*", default=["config.yaml"],
                    help="config.yaml, then the files you pass with --configfile (malformed YAML: file and line)")
    args = ap.parse_args(argv)
    try:
        full = checked_config(load_merged(args.config))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(yaml.safe_dump(full, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
