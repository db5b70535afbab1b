"""
Resolve a run's configuration from defaults, config files and command-line overrides.

    from configurator import configure
    cfg = configure(defaults, sys.argv[1:], choices={"device": ("auto", "cuda", "cpu")})

`defaults` is a dict of plain values (train.py passes settings.DEFAULTS). The arguments are applied in
order: `path/to/config.py` runs that file as plain Python and takes its top-level assignments; `--key=value` sets one
key, the value parsed with `ast.literal_eval` and, when that fails, kept as a string (`--out_dir=out/x`).

Every key must already exist in `defaults`, and every value must have the default's type (an int is accepted for a
float; a key whose default is None accepts anything). A mistake stops the program with one message that names the key
and the closest known keys: a ConfigError, which is a SystemExit, so the user sees the message and exit status 1
rather than a traceback. Unlike nanoGPT's configurator nothing is exec'd into the caller's globals.
"""

import ast
import difflib
import os
import types


class ConfigError(SystemExit):
    """A bad config key, value or file. Exits with status 1 and prints only the message."""

    def __init__(self, message):
        super().__init__("config error: " + message)


def configure(defaults, argv, choices=None):
    """Return a new dict: `defaults` updated by the config files and `--key=value` overrides in `argv`, in order."""
    cfg = dict(defaults)
    choices = choices or {}
    for arg in argv:
        if arg.startswith("--"):
            key, value = _parse_override(arg)
            _set(cfg, defaults, choices, key, value, source=f"override {arg!r}")
        else:
            for key, value in _read_config_file(arg).items():
                _set(cfg, defaults, choices, key, value, source=f"config file {arg}")
    return cfg


def _parse_override(arg):
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} has no value; write it as --key=value (e.g. --compile=False)")
    key, text = arg[2:].split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string such as --out_dir=out/run1
    return key, value


def _read_config_file(path):
    """Run a config file in a fresh namespace; return its top-level assignments (not modules, functions, _names)."""
    if not os.path.isfile(path):
        hint = "; keys are given as --key=value" if "=" in path else ""
        raise ConfigError(f"config file {path!r} does not exist{hint}")
    with open(path) as f:
        source = f.read()
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:  # a broken config file: say which file and line, not a deep traceback
        raise ConfigError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    skip = (types.ModuleType, types.FunctionType, type)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, skip)}


def _set(cfg, defaults, choices, key, value, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "no known key is close; the keys are the defaults"
        raise ConfigError(f"unknown key {key!r} in {source}; {hint}")
    value = _check_type(key, value, defaults[key], source)
    if key in choices and value not in choices[key]:
        allowed = ", ".join(repr(c) for c in choices[key])
        raise ConfigError(f"{key}={value!r} in {source} is not one of {allowed}")
    cfg[key] = value


def _check_type(key, value, default, source):
    """Return value (an int converted for a float key) or raise ConfigError naming the expected type."""
    if default is None:
        return value
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if type(value) is want:  # exact: True is not accepted for an int key, 1 is not accepted for a bool key
        return value
    raise ConfigError(
        f"{key} in {source} must be {want.__name__} like its default {default!r}, got {type(value).__name__} {value!r}"
    )
