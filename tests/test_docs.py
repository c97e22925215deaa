"""README and docs cannot drift from the code where that is cheap to check."""
import os
import re

import pytest

from conftest import ROOT, dm

BENCHMARK_OPTIONS = ("help", "lowercase_name", "no_amp", "dry", "steps", "rounds", "stds", "filter", "filters", "agrees", "centers", "ckpts", "only", "seeds", "plot", "summary", "minutes", "out", "g_ckpt", "compare_n", "which")
DOCS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs", "results.md")]


@pytest.mark.parametrize("path", DOCS)
def test_every_constant_and_option_named_in_the_docs_exists(path):
    text = open(path, encoding="utf-8").read()
    for name in set(re.findall(r"`([A-Z][A-Z0-9_]{2,})[ `=]", text)):
        assert hasattr(dm, name), f"{os.path.basename(path)} names {name}, which dcgan_mnist.py does not define"
    options = {n.lower() for n in dm.CONFIG_NAMES} | {o for c in dm.COMMAND_OPTIONS.values() for o in c}
    for name in set(re.findall(r"(?<![\w-])--([a-z_]+)", text)):
        assert name in options or name in BENCHMARK_OPTIONS, f"{os.path.basename(path)} names --{name}"


def test_readme_lists_the_settings_a_resumed_run_cannot_change():
    readme = open(DOCS[0], encoding="utf-8").read()
    line = next(l for l in readme.splitlines() if "cannot change" in l)
    assert re.findall(r"`(\w+)`", line) == list(dm.FIXED_ON_RESUME)


def test_readme_reaches_the_first_command_early_and_stays_short():
    lines = open(DOCS[0], encoding="utf-8").read().splitlines()
    assert lines.index("pip install -r requirements.txt") < 15 and len(lines) <= 170
    assert not [l for l in lines if re.search(r"\.\./shared|\bsessions?\b|build machine", l)]
